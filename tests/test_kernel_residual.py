"""kernels.residual (an SSAR refresh's D and D2 in one pass) against its reference, and the SSAR refresh
that uses it against the former multi-pass path: the same numbers, bit for bit."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_core.models.attention import AttentionCall, StepInfo
from quantsparse_core.sparse import ssar as ssar_mod
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention
from quantsparse_kernels.residual import refresh_residuals
from quantsparse_kernels.residual_ref import refresh_residuals_ref
from kernel_marks import interpreted


@interpreted
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_prev", [True, False])
def test_kernel_equals_reference_bit_for_bit(rng, out_dtype, with_prev):
    shape = (2, 37, 96)   # not a multiple of the kernel's block: a partial last program
    full, sparse = (torch.randn(shape, generator=rng).to(torch.bfloat16) for _ in range(2))
    prev = (torch.randn(shape, generator=rng) * 0.1).to(torch.bfloat16) if with_prev else None
    d, d2 = refresh_residuals(full, sparse, prev, out_dtype)
    rd, rd2 = refresh_residuals_ref(full, sparse, prev, out_dtype)
    assert d.dtype == out_dtype and torch.equal(d, rd)
    assert (d2 is None) == (not with_prev)
    if with_prev:
        assert d2.dtype == torch.float32 and torch.equal(d2, rd2)
    # and it is what the words say: fp32 differences
    assert torch.equal(rd.float(), (full.float() - sparse.float()).to(out_dtype).float())


def test_bad_inputs_are_refused(rng):
    a = torch.randn(2, 8, generator=rng)
    with pytest.raises(ValueError, match="one shape on one device"):
        refresh_residuals(a, a[:, :4], None)
    with pytest.raises(ValueError, match="contiguous fp16/bf16/fp32"):
        refresh_residuals(a.t(), a.t(), None)


def run(placement, steps=13, seed=3):
    """A 12-step standard run over two blocks (dense, refreshes at 1, 4, 7, 10: second order from the second
    one) on bf16 q/k/v that drift step by step; outputs per step."""
    g = torch.Generator().manual_seed(seed)
    txt, grid, d = 16, (2, 8, 8), 64
    length = txt + 128
    base = [torch.randn(2, 1, 2, length, d, generator=g) for _ in range(3)]
    drift = [torch.randn(2, 1, 2, length, d, generator=g) * 0.01 for _ in range(3)]
    att = SSARAttention(SparseSettings(density=0.3, block=32, n_rows=8, warmup_steps=1, tau=3, warmup_blocks=0,
                                       schedule="standard", placement=placement, svd_rank=4))
    sig = torch.linspace(1, 0, steps)
    outs = []
    for i in range(steps - 1):
        for blk in range(2):
            q, k, v = ((b[blk] + i * dr[blk]).to(torch.bfloat16) for b, dr in zip(base, drift))
            outs.append(att(q, k, v, None, AttentionCall("double", blk, 2, txt, grid, step=StepInfo(i, sig))))
    return outs, att


@interpreted
@pytest.mark.parametrize("placement", ["gpu-bf16", "cpu-pinned"])
def test_one_pass_refresh_equals_the_multi_pass_path(monkeypatch, placement):
    """The refresh's D and D2 from the one-pass kernel (placements that keep D in bf16; Triton's interpreter
    here) give the same outputs at every step as the former fp32 copy / subtract / get / negate / add /
    bf16-put sequence; the kernel really ran, with and without a previous D."""
    import quantsparse_kernels.residual as kernel
    calls = []
    real = kernel.refresh_residuals

    def spy(full, sparse, prev, out_dtype):
        calls.append(prev is not None)
        return real(full, sparse, prev, out_dtype)

    monkeypatch.setattr(kernel, "refresh_residuals", spy)
    with dispatch.forced("triton"):
        fused, att = run(placement)
        assert att.stats["refresh"] == 8 and att.stats["mask_changed"] <= 2  # second-order refreshes happened
        assert True in calls and False in calls   # refreshes after the first: with D_prev and (order 1) without
        n = len(calls)
        monkeypatch.setattr(ssar_mod, "residual_kernel", lambda *a: None)
        plain, _ = run(placement)
        assert len(calls) == n                    # the multi-pass path does not call it
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert torch.equal(a, b), i


def test_without_the_kernel_the_refresh_keeps_the_multi_pass_path(monkeypatch):
    """The PyTorch mode never takes the one-pass branch (its PyTorch form would hold O_sparse and two fp32
    temporaries at once): dispatch.residual_kernel answers None."""
    with dispatch.forced("torch"):
        x = torch.zeros(1, 4, 8)
        assert dispatch.residual_kernel(x, x, x) is None


@interpreted
@pytest.mark.parametrize("with_sparse,with_prev", [(True, True), (True, False), (False, False)])
def test_int8_rows_kernel_equals_reference_bit_for_bit(rng, with_sparse, with_prev):
    """kernels.residual.int8_residuals (the gpu-int8 cache's D and D2 in one pass) against its reference: the
    same codes, scales and drift, on rows of mixed magnitude (a row of zeros too: its scale is the tiny floor)
    and at a width that is not a power of two (a masked tail in the row's program)."""
    from quantsparse_kernels.residual import int8_residuals
    from quantsparse_kernels.residual_ref import int8_residuals_ref
    shape = (2, 5, 96)
    mag = torch.logspace(-4, 2, 5).view(1, 5, 1)
    full = (torch.randn(shape, generator=rng) * mag).to(torch.bfloat16)
    full[1, 2] = 0
    # fixed rows: absmax 127 (scale exactly 1: exact half steps, where half-to-even and half-away differ) and
    # absmax 9 (where max / 127 and max x fp32(1/127) are different floats)
    halves = torch.tensor([2.5, -2.5, 3.5, 0.5, -0.5, 1.5, 126.5, -126.5])
    full[0, 0] = torch.cat((torch.tensor([127.0]), halves.repeat(12)[:95])).to(torch.bfloat16)
    full[0, 1] = (torch.rand(96, generator=rng) * 16 - 8).to(torch.bfloat16)
    full[0, 1, 5] = 9.0
    sparse = (full.float() + torch.randn(shape, generator=rng) * mag * 0.1).to(torch.bfloat16) if with_sparse else None
    if with_sparse:
        sparse[1, 2] = 0
        sparse[0, :2] = 0   # the fixed rows reach D as they are
    prev = None
    if with_prev:
        prev = int8_residuals_ref(torch.randn(shape, generator=rng) * mag)[:2]
    got = int8_residuals(full, sparse, *(prev or (None, None)))
    ref = int8_residuals_ref(full, sparse, *(prev or (None, None)))
    assert got[0].dtype == torch.int8 and torch.equal(got[0], ref[0])
    assert got[1].shape == (2, 5, 1) and torch.equal(got[1], ref[1])
    assert (got[2] is None) == (not with_prev)
    if with_prev:
        assert torch.equal(got[2], ref[2])
    # and the reference is what its words say: absmax x fp32(1/127), round half to even, clamp
    d = full.float() - (sparse.float() if with_sparse else 0)
    inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(127.0, dtype=torch.float32)
    scale = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * inv
    assert torch.equal(ref[1], scale) and torch.equal(ref[0], torch.round(d / scale).clamp(-127, 127).to(torch.int8))
    err = (ref[0].float() * ref[1] - d).abs().amax(-1, keepdim=True)
    assert bool((err <= scale * (0.5 + 1e-4)).all())   # within half a step of each row's grid (+ fp32 rounding)
    assert float(ref[1][0, 0]) == 1.0 and ref[0][0, 0, 1:5].tolist() == [2, -2, 4, 0]   # half to even
    nine = torch.tensor(9.0)
    assert float(nine * inv) != float(nine / torch.tensor(127.0))   # the row tells the two apart
    assert float(ref[1][0, 1]) == float(nine * inv)


@interpreted
def test_int8_rows_give_a_row_holding_nan_a_nan_scale_as_the_reference(rng):
    """A NaN in D (a NaN attention output) is not hidden in the cache: its row's scale is NaN in the kernel as in
    the reference (tl.max skips NaN, amax does not); the other rows are unchanged."""
    from quantsparse_kernels.residual import int8_residuals
    from quantsparse_kernels.residual_ref import int8_residuals_ref
    x = torch.randn(3, 40, generator=rng)
    x[1, 7] = float("nan")
    got, ref = int8_residuals(x), int8_residuals_ref(x)
    assert torch.isnan(got[1][1]).all() and torch.isnan(ref[1][1]).all()
    keep = [0, 2]
    assert torch.equal(got[0][keep], ref[0][keep]) and torch.equal(got[1][keep], ref[1][keep])


def test_int8_rows_refuses_what_it_cannot_hold(rng):
    from quantsparse_kernels.residual import MAX_ROW, int8_residuals
    x = torch.randn(2, 8, generator=rng)
    with pytest.raises(ValueError, match="contiguous float rows"):
        int8_residuals(x.t())
    with pytest.raises(ValueError, match="contiguous float rows"):
        int8_residuals(torch.randn(1, MAX_ROW + 1, generator=rng))
    with pytest.raises(ValueError, match="contiguous float rows"):
        int8_residuals(x, None, torch.zeros(2, 8, dtype=torch.int8))   # codes without their scale


@interpreted
def test_int8_placement_refresh_is_the_same_with_the_kernel_and_with_the_reference(monkeypatch):
    """The gpu-int8 placement's refreshes (D as int8 rows and D2 against the cached codes, one pass) give the
    same outputs at every step with the kernel (Triton's interpreter) as with its PyTorch reference (tested
    above), and the kernel ran with and without a previous D."""
    import quantsparse_kernels.residual as kernel
    calls = []
    real = kernel.int8_residuals

    def spy(x, sparse=None, prev_codes=None, prev_scale=None):
        calls.append((sparse is not None, prev_codes is not None))
        return real(x, sparse, prev_codes, prev_scale)

    monkeypatch.setattr(kernel, "int8_residuals", spy)
    with dispatch.forced("triton"):
        fused, att = run("gpu-int8")
        assert att.stats["refresh"] == 8 and att.stats["mask_changed"] <= 2
        assert (True, True) in calls and (True, False) in calls   # refreshes with D_prev and (first) without
        n = len(calls)
        monkeypatch.setattr(kernel, "supports_int8", lambda *a: False)   # dispatch.int8_rows: the reference
        plain, _ = run("gpu-int8")
        assert len(calls) == n
    for i, (a, b) in enumerate(zip(fused, plain)):
        assert torch.equal(a, b), i


def test_an_int8_rows_kernel_that_fails_is_said_once_and_the_reference_serves(rng, monkeypatch, caplog):
    """dispatch.int8_rows: a kernel that raises (a Triton that cannot compile it) is logged once and the reference
    gives the numbers from then on (not a failed refresh); out-of-memory still ends the call."""
    import quantsparse_kernels.residual as kernel
    from quantsparse_kernels.residual_ref import int8_residuals_ref
    calls = []
    real_kernel = kernel.int8_residuals

    def broken(*a):
        calls.append(1)
        raise RuntimeError("cannot compile _int8_residuals here")

    monkeypatch.setattr(kernel, "int8_residuals", broken)
    monkeypatch.setattr(dispatch, "kernel_failures", {})
    monkeypatch.delenv(dispatch.STRICT_ENV)  # a user's run: the tests' strict mode would raise
    x, s = (torch.randn(3, 40, generator=rng) for _ in range(2))
    with dispatch.forced("triton"), caplog.at_level("WARNING", logger="quantsparse"):
        for _ in range(2):
            got = dispatch.int8_rows(x, s)
            assert all(torch.equal(a, b) for a, b in zip(got[:2], int8_residuals_ref(x, s)[:2])) and got[2] is None
    assert len(calls) == 1 and sum("int8 residual kernel failed" in r.message for r in caplog.records) == 1

    def oom(*a):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernel, "int8_residuals", oom)
    monkeypatch.setattr(dispatch, "kernel_failures", {})
    with dispatch.forced("triton"), pytest.raises(torch.OutOfMemoryError):
        dispatch.int8_rows(x, s)
    # a caller's wrong tensors are refused, not taken for a kernel that cannot compile
    monkeypatch.setattr(kernel, "int8_residuals", real_kernel)
    monkeypatch.setattr(dispatch, "kernel_failures", {})
    with dispatch.forced("triton"), pytest.raises(ValueError, match="prev_scale"):
        dispatch.int8_rows(x, s, torch.zeros(3, 40, dtype=torch.int8), torch.ones(2))
    assert not dispatch.kernel_failures

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

"""Fused activation quantization and W8A8 / W4A8 GEMM kernels vs their references (Triton interpreter
on CPU at small shapes; the same code runs compiled on CUDA)."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_kernels.act_quant import act_quant
from quantsparse_kernels.act_quant_ref import act_quant_ref
from quantsparse_kernels.int_gemm import _launch_tma, int_gemm, prepare_weight, unpack_prepared_w4
from quantsparse_kernels.int_gemm_ref import int_gemm_ref
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.dispatch import pack_int4, unpack_int4
from quantsparse_core.quant.transforms import hadamard, kron_factors
from kernel_marks import interpreted


def _check_act(x, bits, inv_s, clip, r1=None, r2=None, variant="auto"):
    q, s = act_quant(x, bits, inv_s, clip, r1, r2, variant=variant)
    qr, sr = act_quant_ref(x, bits, inv_s, clip, r1, r2)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (qr.shape[0], 1)
    assert q.abs().max() <= qmax
    torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
    diff = (q.int() - qr.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3  # only rounding ties may differ
    torch.testing.assert_close(q.float() * s, qr.float() * sr, rtol=0, atol=float(sr.max()) * 1.0001)
    return q, s


@interpreted
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("variant", ["rows", "onepass", "chunked"])
def test_act_quant_matches_reference_with_smoothing_and_clip(rng, bits, variant):
    for K, dtype in ((96, torch.float32), (256, torch.bfloat16), (200, torch.float16)):
        x = (torch.randn(37, K, generator=rng) * 3).to(dtype)
        x[5, 7] = 40.0  # an outlier row, clipped
        inv_s = torch.rand(K, generator=rng) + 0.5
        clip = float(torch.rand((), generator=rng) * 0.5 + 0.5)
        q, s = _check_act(x, bits, inv_s, clip, variant=variant)
        # the scale is the clipped absmax of the smoothed row over qmax
        xs = x.float() * inv_s
        torch.testing.assert_close(s[:, 0], xs.abs().amax(1) * clip / (2 ** (bits - 1) - 1), rtol=1e-6, atol=0)
        _check_act(x, bits, None, 1.0, variant=variant)


@interpreted
@pytest.mark.parametrize("config", [None, dict(SPLIT=True), dict(ROWS=4, CHUNK=32, num_warps=4),
                                    dict(ROWS=2, CHUNK=512, num_warps=4, SPLIT=True), dict(FAST=False)])
def test_act_quant_rows_variant_is_bit_exact(rng, config):
    """The rows kernel (several rows per program; one pass as a split or padded tile, or two passes in
    CHUNK pieces; fast or IEEE-division codes) gives the reference's codes and scales exactly. Odd M
    (not a multiple of ROWS) and K (a split tile 256 + 64, a padded one, two-pass remainders)."""
    for M, K, dtype in ((37, 300, torch.bfloat16), (5, 96, torch.float32), (19, 17, torch.float16)):
        x = (torch.randn(M, K, generator=rng) * 3).to(dtype)
        x[M // 2, K // 3] = 50.0
        inv_s = torch.rand(K, generator=rng) + 0.5
        clip = float(torch.rand((), generator=rng) * 0.5 + 0.5)
        for bits in (8, 6):
            for smooth, c in ((inv_s, clip), (None, 1.0)):
                q, s = act_quant(x, bits, smooth, c, variant="rows", config=config)
                qr, sr = act_quant_ref(x, bits, smooth, c)
                assert torch.equal(s, sr), (M, K, bits)
                assert torch.equal(q, qr), (M, K, bits, int((q != qr).sum()))


@interpreted
def test_act_quant_rows_division_near_rounding_boundaries(rng):
    """x / scale without a division (reciprocal + fma correction) must round like IEEE division even
    where the quotient lies within an ulp of a half-integer: probe exactly those inputs."""
    rows, K = 64, 256
    amax = torch.rand(rows, 1, generator=rng) * 10 + 0.1
    scale = amax / 127  # the kernel's scale for these rows (clip 1): fp32 division, as in the reference
    k = torch.randint(-126, 126, (rows, K), generator=rng).float() + 0.5
    x = k * scale  # fp32 products: near (often at) ties of x / scale
    step = torch.randint(-2, 3, (rows, K), generator=rng).float()
    x = x + step * torch.finfo(torch.float32).eps * x.abs()  # a few ulps either side
    x[:, 0] = amax[:, 0]
    q, s = act_quant(x, 8, variant="rows")
    qr, sr = act_quant_ref(x, 8)
    assert torch.equal(s, sr)
    assert torch.equal(q, qr), int((q != qr).sum())


@interpreted
@pytest.mark.parametrize("rot", ["hadamard", "dct"])
def test_act_quant_with_kronecker_rotation(rng, rot):
    K = 64 if rot == "hadamard" else 96  # 96 = 8 x 12: not a power of two -> DCT basis
    n1, n2 = kron_factors(K)
    r1, r2 = hadamard(n1).float(), hadamard(n2).float()
    x = torch.randn(3, 13, K, generator=rng)  # leading dims flatten to M = 39
    inv_s = torch.rand(K, generator=rng) + 0.5
    q, s = _check_act(x, 8, inv_s, 0.9, r1, r2)
    assert q.shape == (39, K)


@interpreted
def test_act_quant_rounds_ties_to_even_like_torch():
    # rows whose absmax is 127 give scale 1 exactly: x / s = x, so the halves are exact ties
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 127.0]])
    q, s = act_quant(x, 8)
    assert s.item() == 1.0
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 3, 127]]


def _weights(rng, bits, N, K):
    lo = -8 if bits == 4 else -(2 ** (bits - 1) - 1)
    codes = torch.randint(lo, -lo + (bits != 4), (N, K), generator=rng, dtype=torch.int8)
    return codes, (pack_int4(codes) if bits == 4 else codes)


@interpreted
@pytest.mark.parametrize("bits,unpack", [(8, "auto"), (6, "auto"), (4, "fused"), (4, "separate")])
def test_int_gemm_matches_exact_reference(rng, bits, unpack):
    for M, K, N, bias, out in ((37, 64, 48, True, torch.float32), (37, 256, 96, False, torch.bfloat16),
                               (5, 96, 80, True, torch.float16)):
        a = torch.randint(-127, 128, (M, K), generator=rng, dtype=torch.int8)
        sa = torch.rand(M, 1, generator=rng) * 0.01 + 1e-3  # outputs stay within fp16 range
        sw = torch.rand(N, 1, generator=rng) * 0.01 + 1e-3
        b = torch.randn(N, generator=rng) if bias else None
        codes, stored = _weights(rng, bits, N, K)
        w = prepare_weight(stored, bits, sw)
        y = int_gemm(a, sa, w, b, out_dtype=out, unpack=unpack)
        ref = int_gemm_ref(a, sa, stored, sw, bits, b, torch.float64)
        assert y.dtype == out and y.shape == (M, N)
        tol = 1e-6 if out == torch.float32 else 8e-3  # fp32 epilogue; half-precision output rounding
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < tol, (M, K, N, float(err))


@interpreted
@pytest.mark.parametrize("bits,opts", [(8, ""), (4, ""), (8, "store"), (8, "store+subtile+flatten"), (4, "flatten")])
def test_persistent_tma_gemm_matches_exact_reference(rng, bits, opts):
    """The large-M Hopper kernel (TMA tile loads, persistent tile loop; TMA_OPTIONS: TMA-store epilogue,
    split in halves, flattened loop), run at small tiles, a partial last row tile included."""
    M, K, N = 37, 96, 80
    a = torch.randint(-127, 128, (M, K), generator=rng, dtype=torch.int8)
    sa = torch.rand(M, 1, generator=rng) * 0.01 + 1e-3
    sw = torch.rand(N, 1, generator=rng) * 0.01 + 1e-3
    b = torch.randn(N, generator=rng)
    codes, stored = _weights(rng, bits, N, K)
    w = prepare_weight(stored, bits, sw)
    if bits == 4:
        w = unpack_prepared_w4(w)
    c = torch.full((M, N), float("nan"))
    _launch_tma(a, sa.reshape(M), w, b, c, (32, 32, 32, 4, 2, opts))
    ref = int_gemm_ref(a, sa, stored, sw, bits, b, torch.float64)
    assert ((c.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    c16 = torch.full((M, N), float("nan"), dtype=torch.bfloat16)   # the dtype the model runs in
    _launch_tma(a, sa.reshape(M), w, b, c16, (32, 32, 32, 4, 2, opts))
    assert ((c16.double() - ref).abs().max() / ref.abs().max()) < 8e-3  # bf16 output rounding


def test_tma_tile_options_are_checked():
    w = prepare_weight(torch.ones(32, 32, dtype=torch.int8), 8, torch.ones(32, 1))
    a, sa, c = torch.ones(32, 32, dtype=torch.int8), torch.ones(32), torch.empty(32, 32)
    with pytest.raises(ValueError, match="unknown TMA tile options"):
        _launch_tma(a, sa, w, None, c, (32, 32, 32, 4, 2, "store+fast"))
    with pytest.raises(ValueError, match="'subtile' needs 'store'"):
        _launch_tma(a, sa, w, None, c, (32, 32, 32, 4, 2, "subtile"))


@interpreted
def test_int_gemm_overwrites_poisoned_output(rng, monkeypatch):
    """Every output element is written: a NaN-filled allocation must not leak through."""
    real_empty = torch.empty

    def poisoned(*args, **kw):
        t = real_empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype == torch.int8:
            t.fill_(-128)  # outside every code range
        return t
    monkeypatch.setattr(torch, "empty", poisoned)
    a = torch.randint(-127, 128, (37, 64), generator=rng, dtype=torch.int8)
    codes, stored = _weights(rng, 4, 48, 64)
    w = prepare_weight(stored, 4, torch.rand(48, 1, generator=rng))
    for unpack in ("fused", "separate"):
        y = int_gemm(a, torch.rand(37, 1, generator=rng), w, unpack=unpack, out_dtype=torch.float32)
        assert torch.isfinite(y).all()
    q, s = act_quant(torch.randn(37, 96, generator=rng), 8)
    assert (q != -128).all() and torch.isfinite(s).all()


@interpreted
def test_int4_prepare_and_unpack_are_exact(rng):
    codes, packed = _weights(rng, 4, 48, 96)
    w = prepare_weight(packed, 4, torch.rand(48, 1, generator=rng))
    assert w.data.shape == (48, 48) and w.data.dtype == torch.int8
    assert torch.equal(unpack_prepared_w4(w).data, codes)
    assert torch.equal(unpack_int4(packed), codes)


@interpreted
@pytest.mark.parametrize("w_bits,a_bits,smooth,rotation", [(4, 8, True, None), (8, 8, True, "hadamard"),
                                                          (6, 6, False, "learned"), (4, 8, True, "learned")])
def test_quant_linear_triton_and_torch_paths_agree(rng, w_bits, a_bits, smooth, rotation):
    lin = torch.nn.Linear(96, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 96, generator=rng) * 0.1)
        lin.bias.copy_(torch.randn(48, generator=rng) * 0.1)
    q = QuantLinear(lin, w_bits, a_bits, smooth, rotation)
    with torch.no_grad():
        if smooth:
            q.log_smooth.copy_(torch.randn(96, generator=rng) * 0.5)
        if rotation == "learned":
            q.r1.param.copy_(torch.randn(q.r1.param.shape, generator=rng) * 0.3)
        q.a_clip.fill_(0.9)
    q.freeze()
    x = torch.randn(2, 19, 96, generator=rng)
    with dispatch.forced("torch"):
        y_ref = q(x)
    with dispatch.forced("triton"):
        y = q(x)
        assert q._kernel_state is not None  # the kernel layout was prepared ...
    assert "_kernel_state" not in "".join(q.state_dict())  # ... and is not part of the checkpoint
    assert set(q.packed_tensors()) >= {"weight_packed", "weight_scale"}
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * float(y_ref.abs().max()))
    with dispatch.forced("triton"):
        yb = q(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), q(x.to(torch.bfloat16).float()), rtol=2e-2, atol=2e-2)


def test_bad_input_gets_clear_errors(rng):
    a = torch.randint(-127, 128, (8, 64), generator=rng, dtype=torch.int8)
    sa = torch.rand(8, 1, generator=rng)
    codes, packed = _weights(rng, 4, 16, 64)
    w4 = prepare_weight(packed, 4, torch.rand(16, 1, generator=rng))
    w8 = prepare_weight(codes, 8, torch.rand(16, 1, generator=rng))
    with pytest.raises(ValueError, match="does not match"):
        int_gemm(torch.randint(-127, 128, (8, 32), generator=rng, dtype=torch.int8), sa, w8)
    with pytest.raises(ValueError, match="even K"):
        int_gemm(torch.randint(-127, 128, (8, 63), generator=rng, dtype=torch.int8), sa,
                 type(w4)(w4.data, 4, 63, w4.scale))
    with pytest.raises(ValueError, match="int8 codes"):
        int_gemm(a.float(), sa, w8)
    with pytest.raises(ValueError, match="fp32"):
        int_gemm(a, sa.double(), w8)
    with pytest.raises(ValueError, match="prepare_weight"):
        int_gemm(a, sa, codes)
    with pytest.raises(ValueError, match="uint8"):
        prepare_weight(codes, 4, torch.rand(16, 1))
    with pytest.raises(ValueError, match="int8 codes"):
        prepare_weight(codes.float(), 8, torch.rand(16, 1))
    with pytest.raises(ValueError, match="one per output channel"):
        prepare_weight(codes, 8, torch.rand(15, 1))
    with pytest.raises(ValueError, match="float input"):
        act_quant(a, 8)
    with pytest.raises(ValueError, match="6 or 8"):
        act_quant(torch.randn(4, 64, generator=rng), 4)
    with pytest.raises(ValueError, match="inv_smooth"):
        act_quant(torch.randn(4, 64, generator=rng), 8, torch.ones(32))
    with pytest.raises(ValueError, match="multiply to K"):
        act_quant(torch.randn(4, 64, generator=rng), 8, None, 1.0, torch.eye(4), torch.eye(8))

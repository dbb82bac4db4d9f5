"""LoRA side paths in the quantized GEMM's epilogue (kernels.int_gemm's `lora`, QuantLinear's `side`): the
kernels against the exact float64 reference plus h @ up^T, and QuantLinear's paths against each other."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_core.dispatch import pack_int4
from quantsparse_core.quant.linear import SIDE_RANK_MULTIPLE, QuantizedInput, QuantLinear
from quantsparse_kernels.int_gemm import LORA_RANK_MULTIPLE, _launch_tma, int_gemm, prepare_weight
from quantsparse_kernels.int_gemm_ref import int_gemm_ref
from kernel_marks import interpreted


def _rel(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


def _problem(rng, M, K, N, R, bits=8, dtype=torch.float32):
    """Random codes, scales, bias and a side path whose term is as large as the GEMM's (so a dropped or
    misplaced term fails)."""
    a = torch.randint(-127, 128, (M, K), generator=rng, dtype=torch.int8)
    sa = torch.rand(M, 1, generator=rng) * 0.01 + 1e-3
    sw = torch.rand(N, 1, generator=rng) * 0.01 + 1e-3
    lo = -8 if bits == 4 else -127
    codes = torch.randint(lo, -lo + (bits != 4), (N, K), generator=rng, dtype=torch.int8)
    stored = pack_int4(codes) if bits == 4 else codes
    bias = torch.randn(N, generator=rng)
    h = (torch.randn(M, R, generator=rng) * 2).to(dtype)
    up = torch.randn(N, R, generator=rng).to(dtype)
    return a, sa, sw, stored, bias, h, up


def test_side_rank_multiple_is_the_kernels():
    assert SIDE_RANK_MULTIPLE == LORA_RANK_MULTIPLE


@interpreted
@pytest.mark.parametrize("bits,unpack", [(8, "auto"), (4, "fused"), (4, "separate")])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_int_gemm_adds_the_side_path_in_its_epilogue(rng, bits, unpack, dtype, tol):
    for M, K, N, R in ((37, 64, 48, 16), (5, 96, 80, 48)):   # a partial row tile, a rank over one chunk
        a, sa, sw, stored, bias, h, up = _problem(rng, M, K, N, R, bits, dtype)
        w = prepare_weight(stored, bits, sw)
        y = int_gemm(a, sa, w, bias, out_dtype=dtype, unpack=unpack, lora=(h, up))
        ref = int_gemm_ref(a, sa, stored, sw, bits, bias, torch.float64, lora=(h, up))
        plain = int_gemm_ref(a, sa, stored, sw, bits, bias, torch.float64)
        assert _rel(plain, ref) > 0.1      # the side path is a large part of the answer
        assert y.dtype == dtype and _rel(y, ref) < tol, (M, K, N, R, _rel(y, ref))


@interpreted
@pytest.mark.parametrize("opts", ["", "store", "store+subtile+flatten"])
def test_persistent_tma_gemm_adds_the_side_path(rng, opts):
    """The large-M Hopper kernel's epilogues (pointer store, TMA store, TMA store in two halves), small tiles."""
    M, K, N, R = 37, 96, 80, 32
    a, sa, sw, stored, bias, h, up = _problem(rng, M, K, N, R, 8, torch.bfloat16)
    w = prepare_weight(stored, 8, sw)
    c = torch.full((M, N), float("nan"), dtype=torch.bfloat16)
    _launch_tma(a, sa.reshape(M), w, bias.float(), c, (32, 32, 32, 4, 2, opts), (h, up))
    ref = int_gemm_ref(a, sa, stored, sw, 8, bias, torch.float64, lora=(h, up))
    assert _rel(c, ref) < 8e-3


def test_side_path_errors_name_the_problem(rng):
    a, sa, sw, stored, bias, h, up = _problem(rng, 8, 32, 16, 16)
    w = prepare_weight(stored, 8, sw)
    with pytest.raises(ValueError, match="multiple of 16"):
        int_gemm(a, sa, w, lora=(h[:, :12], up[:, :12]))
    with pytest.raises(ValueError, match=r"h \[M=8, R\] and up \[N=16, R\]"):
        int_gemm(a, sa, w, lora=(h[:7], up))
    with pytest.raises(ValueError, match="one float dtype"):
        int_gemm(a, sa, w, lora=(h, up.double()))


def _layer(rng, w_bits=4, smooth=True, rotation=None, k=96, n=48):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=rng) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=rng) * 0.1)
    q = QuantLinear(lin, w_bits, 8, smooth, rotation)
    if smooth:
        with torch.no_grad():
            q.log_smooth.copy_(torch.randn(k, generator=rng) * 0.5)
    return q.freeze()


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize("rotation", [None, "hadamard"])
def test_quant_linear_side_equals_output_plus_low_rank_term(rng, path, rotation):
    """forward(x, side) = forward(x) + h up^T in fp32 before the output's rounding, on either path; a rank
    off the kernel's multiple (20) is padded; forward_rows and a producer's QuantizedInput take it too."""
    q = _layer(rng, rotation=rotation)
    x = torch.randn(2, 19, 96, generator=rng)
    down, up = torch.randn(20, 96, generator=rng) * 0.1, torch.randn(48, 20, generator=rng) * 0.1
    h = x @ down.t()
    expected = (h.double() @ up.double().t())
    with dispatch.forced(path):
        y0, y = q(x), q(x, side=(h, up))
        rows = q.forward_rows(x, 10, 40, (h, up))
    assert _rel(expected, expected + y0.double()) > 0.05
    torch.testing.assert_close((y - y0).double(), expected, rtol=0, atol=2e-5 * float(y.abs().max()))
    torch.testing.assert_close(rows, y[..., 10:40], rtol=0, atol=2e-5 * float(y.abs().max()))
    if rotation is None:   # a QuantizedInput (a producer's codes) with the side path
        with dispatch.forced(path):
            codes, scale = _codes(q, x, path)
            yq = q(QuantizedInput(codes, scale, (2, 19), torch.float32), side=(h, up))
        torch.testing.assert_close(yq, y, rtol=0, atol=2e-5 * float(y.abs().max()))
    with dispatch.forced(path):   # bf16, the model's dtype: rounded once, after the sum
        yb = q(x.bfloat16(), side=(h.bfloat16(), up.bfloat16()))
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=2e-2, atol=2e-2 * float(y.abs().max()))


def _codes(q, x, path):
    """x's int8 codes + scales for layer q, as a producer would hand them over (inside dispatch.forced(path))."""
    if path == "triton":
        st = q.prepare_kernels()
        return dispatch.quantized_linear_kernels(x.device)[0].act_quant(x.reshape(-1, 96), 8, st["inv_smooth"], st["clip"])
    from quantsparse_core.quant.quantizers import quantize
    xt = q.transform_input(x.reshape(-1, 96).float())
    sx = q._act_scale(xt)
    return quantize(xt, sx, 8), sx


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=interpreted)])
def test_low_rank_from_a_producers_codes(rng, path):
    """LowRank (a LoRA beside the layer) from the fused blocks' int8 codes: down with the smoothing folded in,
    int8 per row, on the codes; equal to that integer math in float64, and within the quantization error of
    the same LoRA on the float input. Rank 20 is padded to the kernel's multiple."""
    from quantsparse_core.quant.low_rank import LowRank
    q = _layer(rng)
    x = torch.randn(2, 19, 96, generator=rng)
    down, up = torch.randn(20, 96, generator=rng) * 0.1, torch.randn(48, 20, generator=rng) * 0.3
    lr = LowRank(down, up)
    assert lr.down.shape == (32, 96) and lr.up.shape == (48, 32) and not lr.down[20:].any()
    with dispatch.forced(path):
        codes, scale = _codes(q, x, path)
        qi = QuantizedInput(codes, scale, (2, 19), torch.float32)
        term_codes = q(qi, side=lr) - q(qi)
        term_float = q(x, side=lr) - q(x)
    _, dq, ds, _ = lr._int8
    exact = ((codes.double() @ dq.double().t()) * scale.double() * ds.double().t()) @ lr.up.double().t()
    torch.testing.assert_close(term_codes.reshape(-1, 48).double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
    float_term = (x.reshape(-1, 96).double() @ down.double().t()) @ up.double().t()
    assert _rel(term_float.reshape(-1, 48), float_term) < 1e-5
    # From codes the term carries x's quantization error (8-bit rows; the smoothing scales it back per channel)
    # and the int8 rows of down: bounded by twice x's own relative error, plus down's share.
    x_back = (codes.double() * scale.double() * torch.exp(q.log_smooth.double())).reshape(-1, 96)
    x_err = _rel(x_back, x.reshape(-1, 96).double())
    assert _rel(term_codes.reshape(-1, 48), float_term) < 2 * x_err + 5e-3, x_err

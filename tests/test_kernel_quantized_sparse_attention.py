"""The block-sparse kernel's quantised precisions ("int8": INT8 Q.K^T; "int8-fp8": also FP8 e4m3 P.V) in
Triton's CPU interpreter, against the float64 quantised reference (kernels/sparse_attention_ref.py:
the same codes and scales, exact softmax) and against exact attention: mixed head kinds (temporal heads
read through the permutation), padded-text key bias with -inf, partial last block, an empty query
block, the SSAR correction epilogue, the log-sum-exp and the merged refresh. The FP8 MMA itself runs
only on a GPU (tests/test_kernels_cuda.py); here the e4m3 rounding is emulated by bits."""
import pytest
import torch
import triton
import triton.language as tl

from quantsparse_core import dispatch
from quantsparse_core.models.attention import AttentionCall, StepInfo
from quantsparse_core.sparse.layout import temporal_permutation
from quantsparse_core.sparse.masks import BlockMask
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention
from quantsparse_kernels.attention_quant import _int32_to_float
from quantsparse_kernels.refresh_attention import refresh_attention
from quantsparse_kernels.sparse_attention import sparse_attention
from quantsparse_kernels.sparse_attention import supports as sparse_supports
from quantsparse_kernels.sparse_attention_ref import (dense_masked_attention_f64, quantize_v_fp8_ref,
                                                      quantized_sparse_attention_ref)
from kernel_marks import interpreted

TXT, GRID = 7, (3, 4, 5)  # L = 67: a partial last block of 32 (the FP8 MMA reduces over >= 32 keys on a GPU)
L = TXT + 60
KINDS = ["spatial", "temporal", "dense"]
# the kernel rounds P (to bf16, or x 448 to e4m3) before P.V; the reference does not
TOL = {"int8": 1.5e-2, "int8-fp8": 4e-2}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def case(rng, b=2, h=3, d=32, block=32, offset=3.0, spread=True):
    """Inputs where quantisation is what moves the result: key magnitudes that vary 16x along the
    sequence (one INT8 scale per key block must cover them), value channels 100x apart (one e4m3 scale
    per channel), a shared key offset (smoothing matters)."""
    q, k, v = (torch.randn(b, L, h, d, generator=rng).transpose(1, 2) for _ in range(3))
    if spread:
        k = k * torch.exp2(torch.rand(1, 1, L, 1, generator=rng) * 4)
        v = v * torch.logspace(0, 2, d)[torch.randperm(d, generator=rng)]
    k = k + offset * torch.randn(1, h, 1, d, generator=rng)
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    n = -(-L // block)
    keep = torch.rand(h, n, n, generator=rng) < 0.5
    keep[:, 1, :] = False     # a query block that visits nothing: its rows are 0 (+ correction)
    keep[2] = True            # a dense head
    bias = torch.randn(b, L, generator=rng)
    bias[0, 4:TXT] = float("-inf")
    index, count = BlockMask(keep, list(KINDS), block, L).to_indices()
    kw = dict(block=block, key_bias=bias, perm=temporal_permutation(TXT, GRID),
              permuted_heads=[x == "temporal" for x in KINDS])
    return q, k, v, keep, index, count, kw


def exact(q, k, v, keep, kw, correction=None):
    """float64 attention of the unquantised inputs under the same mask."""
    rest = {x: y for x, y in kw.items() if x != "block"}
    return dense_masked_attention_f64(q, k, v, keep, kw["block"], correction=correction, **rest)


@interpreted
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_quantized_kernel_matches_its_float64_reference_and_exact_attention(rng, precision):
    q, k, v, keep, index, count, kw = case(rng)
    corr = torch.randn(2, L, 3 * 32, generator=rng) * 0.1
    out = torch.full((2, L, 96), float("nan"), dtype=torch.bfloat16)
    res = sparse_attention(q, k, v, index, count, correction=corr, out=out, precision=precision, **kw)
    assert res is out and bool(torch.isfinite(res).all())
    ref = quantized_sparse_attention_ref(q, k, v, index, count, precision=precision, correction=corr, **kw)
    assert rel(res, ref) < TOL[precision]
    # the kernel really quantises: the bf16 kernel is much further from the quantised reference
    plain = sparse_attention(q, k, v, index, count, correction=corr, **kw)
    assert rel(res, ref) < 0.6 * rel(plain, ref)
    # what quantising Q, K (and V) costs on these deliberately spread inputs
    assert rel(ref, exact(q, k, v, keep, kw, corr)) < (4e-2 if precision == "int8" else 8e-2)
    # the empty query block's rows of the spatial head are the correction alone
    rows = torch.arange(L)[(torch.arange(L) // 32) == 1]
    assert torch.allclose(res[:, rows, :32].float(), corr[:, rows, :32], atol=1e-2)


@interpreted
def test_smoothing_makes_int8_insensitive_to_a_shared_key_offset(rng):
    """K's mean is subtracted before quantising: a large shared key offset (DiT keys carry one) leaves the
    INT8 result as accurate as without it, where quantising raw K would lose the spread to the offset."""
    errs = []
    for offset in (0.0, 30.0):
        g = torch.Generator().manual_seed(7)
        q, k, v, keep, index, count, kw = case(g, offset=offset, spread=False)
        out = sparse_attention(q, k, v, index, count, precision="int8", **kw)
        errs.append(rel(out, exact(q, k, v, keep, kw)))
    assert errs[1] < 2 * errs[0] + 5e-3, errs


@interpreted
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_lse_and_merged_refresh_in_a_quantised_precision(rng, precision):
    """The lse is that of the unsmoothed scores (q . mean(K) added back): a run over the mask and one over
    its complement merge into the full attention of the same quantised inputs, and D = O_full - O_sparse.
    Unspread inputs: the lse check compares with the bf16 kernel's, which INT8 scores move by little."""
    q, k, v, keep, index, count, kw = case(rng, spread=False)
    lse = torch.empty(2, 3, L)
    sparse_attention(q, k, v, index, count, lse=lse, precision=precision, **kw)
    lse_bf16 = torch.empty(2, 3, L)
    sparse_attention(q, k, v, index, count, lse=lse_bf16, **kw)
    fin = torch.isfinite(lse_bf16)
    assert bool((torch.isfinite(lse) == fin).all())
    assert float((lse - lse_bf16)[fin].abs().max()) < 0.1   # INT8 scores shift the lse by little (base-2 units)
    rest_index, rest_count = BlockMask(~keep, list(KINDS), 32, L).to_indices()
    full, d = refresh_attention(q, k, v, index, count, rest_index, rest_count, precision=precision, **kw)
    all_index, all_count = BlockMask(torch.ones_like(keep), list(KINDS), 32, L).to_indices()
    full_ref = quantized_sparse_attention_ref(q, k, v, all_index, all_count, precision=precision, **kw).double()
    sparse_ref = quantized_sparse_attention_ref(q, k, v, index, count, precision=precision, **kw).double()
    assert rel(full, full_ref) < TOL[precision] and d.dtype == torch.float32
    assert rel(d, full_ref - sparse_ref) < 2 * TOL[precision]


def test_fp8_reference_rounds_v_to_nearest_even_per_channel(rng):
    v = torch.randn(1, 2, 50, 32, generator=rng) * torch.rand(1, 2, 1, 32, generator=rng) * 5
    v8, scale = quantize_v_fp8_ref(v)
    assert v8.dtype == torch.float8_e4m3fn and scale.shape == (1, 2, 32)
    assert torch.allclose(v.abs().amax(2) / 448.0, scale)
    back = v8.float() * scale[:, :, None, :]
    # e4m3: 3 mantissa bits -> within 2^-4 relative of each value (subnormals: half of 2^-9 x scale)
    assert bool(((back - v).abs() <= (v.abs() / 16 + scale[:, :, None, :] * 2 ** -10) * 1.0001).all())


def test_bad_precision_small_head_dim_and_small_fp8_block_are_refused(rng):
    q, k, v = (torch.randn(1, 2, L, 16, generator=rng) for _ in range(3))
    index, count = BlockMask(torch.ones(2, 5, 5, dtype=torch.bool), ["spatial"] * 2, 16, L).to_indices()
    with pytest.raises(ValueError, match="precision must be one of"):
        sparse_attention(q, k, v, index, count, block=16, precision="fp4")
    with pytest.raises(ValueError, match="head_dim >= 32"):
        sparse_attention(q, k, v, index, count, block=16, precision="int8")
    q32 = torch.randn(1, 2, L, 32, generator=rng)
    assert sparse_supports(q32, 16, "int8") and not sparse_supports(q32, 16, "int8-fp8")
    assert sparse_supports(q32, 32, "int8-fp8") and not sparse_supports(q, 32, "int8")
    with pytest.raises(ValueError, match="mask block >= 32"):
        sparse_attention(q32, q32, q32, index, count, block=16, precision="int8-fp8")
    with pytest.raises(ValueError, match="attention_precision"):
        SparseSettings(attention_precision="int4")


@interpreted
@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_ssar_run_in_a_quantised_precision_triton_equals_reference_path(rng, precision):
    """A sampling run's attention calls (dense warm-up, refreshes, reuse with the correction) with
    attention_precision set: the Triton path and the PyTorch reference path agree, every pass goes
    through the quantised kernel (dense passes counted as such, none to SDPA), and the output stays
    close to the bf16 run's."""
    txt, grid, d = 16, (2, 8, 8), 64
    length = txt + 128
    q, k, v = (torch.randn(1, 2, length, d, generator=rng) for _ in range(3))
    sig = torch.linspace(1, 0, 13)
    outs = {}
    for mode in ("torch", "triton"):
        with dispatch.forced(mode):
            att = SSARAttention(SparseSettings(density=0.3, block=32, n_rows=8, warmup_steps=1, tau=3,
                                               warmup_blocks=0, schedule="standard", attention_precision=precision))
            outs[mode] = [att(q, k, v, None, AttentionCall("double", 0, 1, txt, grid, step=StepInfo(i, sig)))
                          for i in range(6)]
            assert att.stats["quantized_dense"] == 1 and att.stats["refresh"] == 2
    for a, b in zip(outs["torch"], outs["triton"]):
        assert rel(b, a) < TOL[precision]
    with dispatch.forced("torch"):
        att = SSARAttention(SparseSettings(density=0.3, block=32, n_rows=8, warmup_steps=1, tau=3,
                                           warmup_blocks=0, schedule="standard"))
        plain = [att(q, k, v, None, AttentionCall("double", 0, 1, txt, grid, step=StepInfo(i, sig))) for i in range(6)]
    for a, b in zip(plain, outs["torch"]):
        assert rel(b, a) < 5e-2


@pytest.mark.parametrize("precision", ["int8", "int8-fp8"])
def test_host_dense_attention_with_a_quantised_precision_keeps_the_residual_consistent(rng, precision):
    """host_attention serves the dense passes (here a plain SDPA host), the sparse passes are quantised: the
    refresh's sparse pass must be quantised too, or D carries the gap between a bf16 and a quantised
    sparse pass into every reuse step. On unchanged q/k/v a reuse step then gives back the host's full
    attention (O_sparse + D = O_full), to float rounding."""
    import torch.nn.functional as F
    txt, grid, d = 16, (2, 8, 8), 64
    length = txt + 128
    q, k, v = (torch.randn(1, 2, length, d, generator=rng) for _ in range(3))
    v = v * torch.logspace(0, 2, d)

    def host(q_, k_, v_, mask_):
        return F.scaled_dot_product_attention(q_, k_, v_).transpose(1, 2).reshape(1, length, 2 * d)

    sig = torch.linspace(1, 0, 13)
    with dispatch.forced("torch"):
        att = SSARAttention(SparseSettings(density=0.3, block=32, n_rows=8, warmup_steps=1, tau=3, warmup_blocks=0,
                                           schedule="standard", host_attention=True, attention_precision=precision,
                                           placement="exact"))
        outs = [att(q, k, v, None, AttentionCall("double", 0, 1, txt, grid, step=StepInfo(i, sig), dense=host))
                for i in range(6)]
    assert att.plan(12).kinds()[:6] == ["dense", "refresh", "reuse", "reuse", "refresh", "reuse"]
    full = host(q, k, v, None)
    for i in (2, 3, 5):
        assert rel(outs[i], full) < 1e-4, i


def test_a_quantised_precision_the_gpu_kernel_cannot_take_falls_back_to_bf16_once_with_a_warning(caplog):
    """On CUDA without a kernel for the precision (no Triton, head_dim < 32, no float8 on the card) the call
    runs bf16 and says so once, instead of the float64 emulation (9 GB of copies at 720p); on the CPU the
    emulation is the reference and stays."""
    from types import SimpleNamespace
    cuda_q = SimpleNamespace(is_cuda=True, shape=(1, 2, 100, 16), dtype=torch.bfloat16)
    dispatch._precision_warned.clear()
    with caplog.at_level("WARNING", logger="quantsparse"):
        assert dispatch._runnable_precision(cuda_q, 128, "int8-fp8", None) == "bf16"
        assert dispatch._runnable_precision(cuda_q, 128, "int8-fp8", None) == "bf16"
        assert dispatch._runnable_precision(cuda_q, 128, "bf16", None) == "bf16"
    said = [r for r in caplog.records if "not available here" in r.getMessage()]
    assert len(said) == 1 and "int8-fp8" in said[0].getMessage()
    assert dispatch._runnable_precision(torch.zeros(1, 2, 100, 16), 128, "int8", None) == "int8"



@triton.jit
def _offset_roundtrip(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, _int32_to_float(tl.load(X + i)))


@interpreted
def test_int32_scores_become_floats_exactly_without_i2f(rng):
    """attention_quant._int32_to_float (the INT8 Q.K^T sums as floats by an integer add on the bits of 1.5 x 2^23,
    then minus that offset): equal to the int32 -> fp32 conversion for every sum an INT8 head of up to 256 channels
    can make, the extremes +-2^22 included."""
    bound = 256 * 128 * 128
    x = torch.randint(-bound, bound + 1, (1024,), generator=rng, dtype=torch.int32)
    x[:4] = torch.tensor([-bound, bound, 0, -1], dtype=torch.int32)
    y = torch.empty(1024, dtype=torch.float32)
    _offset_roundtrip[(1,)](x, y, 1024)
    assert torch.equal(y.double(), x.double())

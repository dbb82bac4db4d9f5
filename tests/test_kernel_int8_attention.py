"""INT8 dense attention (smoothed K, per-block INT8 Q/K scales, P.V in V's dtype): the PyTorch reference
against float64 exact attention, the Triton kernel (Triton's CPU interpreter) against the reference,
allowed-key selection (text padding), rows with no allowed key, the log-sum-exp merge, the dispatch seam.

Tolerances. Each INT8 code is off by at most half a step, amax / 254, per block; for Gaussian blocks
amax is ~3.5 sigma, so Q and K each carry ~0.8% rms relative error and the scores ~1.1%, which softmax
passes on to the output at about that size (1.0-1.2% measured over seeds): 2e-2 against float64.
The kernel does the reference's arithmetic: its codes and scales are bit-identical; its output
differs by fp32 rounding (fp32 V) or by where P is rounded to bf16 (the kernel rounds P against the
running row maximum, the reference against the final one; ~2e-3), far below the quantisation error."""
import math

import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_kernels.int8_attention import int8_attention, quantize_qk
from quantsparse_kernels.int8_attention_ref import (exact_attention_f64, int8_attention_ref, quantize_qk_ref,
                                                    select_keys)
from quantsparse_kernels.refresh_attention import merge
from kernel_marks import interpreted

B, H, L = 2, 2, 67  # L: a partial last block for every block size used here
QUANT_TOL = 2e-2


def rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def qkv(rng, d, dtype=torch.float32, offset=0.0, length=L):
    """[B, H, L, D] views of [B, L, H, D] storage (as the model passes them); K with a shared per-(b, h)
    channel offset of `offset` sigma, as DiT keys carry."""
    q, k, v = (torch.randn(B, length, H, d, generator=rng) for _ in range(3))
    k = k + offset * torch.randn(B, 1, H, d, generator=rng)
    return [x.to(dtype).transpose(1, 2) for x in (q, k, v)]


def test_reference_matches_float64_and_smoothing_matters(rng):
    """With a large shared K offset the unsmoothed INT8 grid is spent on the offset: several times the
    error. Smoothed, the error stays at the no-offset level; the log-sum-exp (with q.mean added back)
    too."""
    q, k, v = qkv(rng, 64, offset=8.0)
    exact, lse_exact = exact_attention_f64(q, k, v, return_lse=True)
    out, lse = int8_attention_ref(q, k, v, q_block=32, k_block=16, return_lse=True)
    plain = int8_attention_ref(q, k, v, q_block=32, k_block=16, smooth=False)
    smoothed_err, plain_err = rel_err(out, exact), rel_err(plain, exact)
    assert smoothed_err < QUANT_TOL
    assert plain_err > 2.5 * smoothed_err, (plain_err, smoothed_err)
    # score errors of ~1% of |s| (a few units here) move log2-sum-exp by a few hundredths at most
    assert float((lse.double() - lse_exact).abs().max()) < 0.1
    q2, k2, v2 = (x.to(torch.bfloat16) for x in (q, k, v))
    out_bf16 = int8_attention_ref(q2, k2, v2)
    assert out_bf16.dtype == torch.bfloat16 and out_bf16.shape == (B, L, H * 64)
    assert rel_err(out_bf16, exact_attention_f64(q2, k2, v2)) < QUANT_TOL


@interpreted
@pytest.mark.parametrize("d", [64, 16])
def test_quantizer_kernel_equals_reference_bit_for_bit(rng, d):
    """Codes (round half to even), scales and K's mean as the reference; D = 16 codes zero-padded to 32."""
    q, k, _ = qkv(rng, d, torch.bfloat16, offset=4.0)
    got, ref = quantize_qk(q, k, q_block=32, k_block=16), quantize_qk_ref(q, k, q_block=32, k_block=16)
    assert got.q_codes.shape[-1] == max(d, 32) and got.q_codes.dtype == torch.int8
    assert torch.equal(got.q_codes[..., :d], ref.q_codes) and torch.equal(got.k_codes[..., :d], ref.k_codes)
    assert not got.q_codes[..., d:].any() and not got.k_codes[..., d:].any()
    assert torch.equal(got.q_scale, ref.q_scale) and torch.equal(got.k_scale, ref.k_scale)
    assert torch.equal(got.k_mean, ref.k_mean)
    torch.testing.assert_close(got.q_shift, ref.q_shift, rtol=1e-5, atol=1e-5)
    assert int(ref.k_codes.abs().max()) == 127  # the grid is used to its end


@interpreted
@pytest.mark.parametrize("dtype,d,config,tol", [
    (torch.float32, 64, (32, 16, 4, 2), 1e-5),    # several full key tiles, two tiles per K scale block
    (torch.bfloat16, 64, (16, 16, 4, 2), 4e-3),
    (torch.bfloat16, 128, None, 4e-3),            # the GPU config: one partial tile of 64 keys
    (torch.float32, 64, (32, 16, 4, 2, True), 1e-5),   # lazy rescaling (LAZY)
    (torch.bfloat16, 64, (16, 16, 4, 2, True), 4e-3),
])
def test_kernel_matches_reference(rng, dtype, d, config, tol):
    q, k, v = qkv(rng, d, dtype, offset=4.0)
    k_block = 64 if config is None else 32
    lse = torch.full((B, H, L), float("nan"))
    out = torch.full((B, L, H * d), float("nan"), dtype=dtype)
    res = int8_attention(q, k, v, q_block=32, k_block=k_block, out=out, lse=lse, config=config)
    ref, lse_ref = int8_attention_ref(q, k, v, q_block=32, k_block=k_block, return_lse=True)
    exact, lse_exact = exact_attention_f64(q, k, v, return_lse=True)
    assert res is out and bool(torch.isfinite(res).all())
    err, quant_err = rel_err(res, ref), rel_err(ref, exact)
    assert err < tol and err < 0.5 * quant_err, (err, quant_err)
    assert rel_err(res, exact) < QUANT_TOL
    assert float((lse - lse_ref).abs().max()) < 1e-4
    assert float((lse.double() - lse_exact).abs().max()) < 0.1


@interpreted
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow the last part provokes
def test_lazy_rescaling_follows_climbing_scores_and_its_threshold_keeps_them_finite(rng, monkeypatch):
    """Scores that climb by ~35 (base 2) per key tile on average make the lazy kernel rescale at every tile: it still does
    the reference's arithmetic. With the threshold out of reach the stale maxima overflow exp2."""
    import triton.language as tl
    import quantsparse_kernels.int8_attention as ia
    q, k, v = qkv(rng, 64)
    direction = torch.randn(64, generator=rng)
    direction /= direction.norm()
    q = q + 3.0 * direction
    k = k + torch.arange(L, dtype=torch.float32)[:, None] * 4.0 * direction   # [B, H, L, D] + [L, D]
    ref = int8_attention_ref(q, k, v, q_block=32, k_block=32)
    lazy = int8_attention(q, k, v, q_block=32, k_block=32, config=(32, 16, 4, 2, True))
    assert rel_err(lazy, ref) < 1e-5
    monkeypatch.setattr(ia, "LAZY_BITS", tl.constexpr(1e30))   # never rescale after the first tile
    stale = int8_attention(q, k, v, q_block=32, k_block=32, config=(32, 16, 4, 2, True))
    assert not bool(torch.isfinite(stale).all())


@interpreted
def test_padding_keys_left_out_by_keep_and_by_mask(rng):
    """ComfyUI's padded text keys (-inf in the additive mask, or an index of the allowed keys): the
    kernel, the reference and the dispatch's mask path agree with float64 attention without those keys."""
    q, k, v = qkv(rng, 64, torch.bfloat16, offset=4.0)
    mask = torch.zeros(1, 1, L)
    mask[..., 3:9] = float("-inf")
    keep = torch.cat((torch.arange(3), torch.arange(9, L)))
    exact = exact_attention_f64(q, k, v, keep=keep)
    # the padded keys carry huge values: they would dominate every row if they were not left out
    k = k.clone()
    k[:, :, 3:9] = 50.0
    out = int8_attention(q, k, v, keep=keep)
    assert rel_err(out, exact) < QUANT_TOL
    assert rel_err(out, int8_attention_ref(q, k, v, keep=keep)) < 4e-3
    with dispatch.forced("triton"):
        tri = dispatch.int8_dense_attention(q, k, v, mask)
    with dispatch.forced("torch"):
        ref = dispatch.int8_dense_attention(q, k, v, mask)
    assert torch.equal(tri, out)
    assert torch.equal(ref, int8_attention_ref(q, k, v, keep=keep))


@interpreted
def test_rows_with_no_allowed_key_are_zero(rng):
    q, k, v = qkv(rng, 32)
    none = torch.zeros(0, dtype=torch.long)
    lse = torch.zeros(B, H, L)
    out = torch.full((B, L, H * 32), float("nan"))
    int8_attention(q, k, v, keep=none, out=out, lse=lse)
    ref, lse_ref = int8_attention_ref(q, k, v, keep=none, return_lse=True)
    assert not out.any() and not ref.any()
    assert bool((lse == float("-inf")).all()) and bool((lse_ref == float("-inf")).all())
    mask = torch.full((1, 1, L), float("-inf"))
    with dispatch.forced("triton"):
        assert not dispatch.int8_dense_attention(q, k, v, mask).any()


@interpreted
def test_two_runs_over_disjoint_keys_merge_to_full_attention(rng):
    """The log-sum-exp of the unsmoothed scores: each run smooths with the mean of its own keys, yet
    kernels.refresh_attention.merge of the two runs is attention over all keys (within INT8 error)."""
    q, k, v = qkv(rng, 64, offset=4.0)
    perm = torch.randperm(L, generator=rng)
    part, rest = perm[:30].sort().values, perm[30:].sort().values
    runs = []
    for keep in (part, rest):
        lse = torch.empty(B, H, L)
        runs += [int8_attention(q, k, v, keep=keep, lse=lse, config=(32, 16, 4, 2)), lse]
    full, _ = merge(*runs)
    assert rel_err(full, exact_attention_f64(q, k, v)) < QUANT_TOL


@interpreted  # CPU tensors: on a CUDA machine without the interpreter they would reach Triton's launcher
def test_bad_inputs_are_refused_with_the_fix(rng):
    q, k, v = qkv(rng, 64)
    with pytest.raises(ValueError, match="head_dim 48"):
        int8_attention(*(x[..., :48] for x in (q, k, v)))
    with pytest.raises(ValueError, match="one dtype"):
        int8_attention(q, k.to(torch.bfloat16), v)
    with pytest.raises(ValueError, match="must divide"):
        int8_attention(q, k, v, k_block=32, config=(32, 64, 4, 2))
    with pytest.raises(ValueError, match="power of two"):
        int8_attention(q, k, v, q_block=48)
    with pytest.raises(ValueError, match="integer index"):
        select_keys(k, v, torch.ones(L, dtype=torch.bool))
    with pytest.raises(ValueError, match="lse must be"):
        int8_attention(q, k, v, lse=torch.empty(B, L, H))
    with pytest.raises(ValueError, match="whole keys"):
        dispatch.int8_dense_attention(q, k, v, torch.randn(1, 1, L, generator=rng))  # a soft bias
    with pytest.raises(ValueError, match="not both"):
        dispatch.int8_dense_attention(q, k, v, torch.zeros(1, 1, L), keep="all")


def test_dispatch_takes_the_reference_on_cpu_and_reports_the_operation(rng, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    q, k, v = qkv(rng, 64)
    out, lse = dispatch.int8_dense_attention(q, k, v, return_lse=True)  # auto on CPU tensors: the reference
    ref, lse_ref = int8_attention_ref(q, k, v, return_lse=True)
    assert torch.equal(out, ref) and torch.equal(lse, lse_ref)
    assert abs(float(lse[0, 0, 0]) - float(torch.logsumexp(q[0, 0, 0].double() @ k[0, 0].double().T / 8, 0))
               / math.log(2)) < 0.1
    with dispatch.forced("torch"):
        assert dispatch.report("cpu")["int8_attention"].startswith("torch")


@interpreted  # quantize_qk launches for real: CPU tensors need the interpreter
def test_a_new_resolution_reuses_the_compiled_kernel_and_tiles_stay_aligned(rng, monkeypatch):
    """Lengths (and the scale / LSE strides that follow them) are kept out of the kernel's specialisation,
    so a new resolution launches the variant already compiled; the batch and head strides of the codes, V
    and O are specialised (multiples of the head dim: divisible by 16), so the compiler can prove each
    tile's rows aligned and load them as vectors. With those strides unspecialised the kernel ran at
    0.35x cuDNN on an H100 (2026-12-06)."""
    import quantsparse_kernels.int8_attention as ia
    from launch_recorder import LaunchRecorder
    d = 64
    keys = []
    for length in (67, 256, 16 * 16 * 2 + 9):
        rec = LaunchRecorder(ia._int8_attn_fwd)
        monkeypatch.setattr(ia, "_int8_attn_fwd", rec)
        q, k, v = qkv(rng, d, torch.bfloat16, length=length)
        int8_attention(q, k, v, lse=torch.empty(B, H, length))
        monkeypatch.undo()
        assert rec.launches and rec.launches[0]["LQ"] == length
        keys.append(rec.keys())
        assert {"sqcb", "sqch", "skcb", "skch", "svb", "svh", "sob", "sol"}.isdisjoint(rec.skip)
        named = dict(keys[-1][0])
        assert all(named[s] == "x16" for s in ("sqcb", "sqch", "skcb", "skch", "svb", "svh", "sob", "sol")), named
    assert keys[0] == keys[1] == keys[2], keys

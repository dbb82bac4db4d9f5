"""SVG masks + SSAR and W4A8 quantization on our Wan DiT (no ComfyUI), float32 on the CPU.

Wan's self-attention is video-only: SSAR sees txt_len 0 and no key mask, so the masks carry no text
rows or columns. Cross-attention stays dense (it never reaches attention_fn). The attention-level checks
record, for every self-attention call, the attention function's output next to dense attention on the
same q, k, v; inputs follow a short Euler trajectory of the dense model, so every attention function
sees the same q, k, v and only the function differs.
"""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from quantsparse_core.dispatch import block_sparse_attention
from quantsparse_core.models.attention import StepInfo, dense_attention
from quantsparse_core.models.wan import WanDiT, get_wan_preset
from quantsparse_core.models.wan_storage import CONTEXT_SUFFIXES, wan_policy
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import quantize_model
from quantsparse_core.sparse.layout import inverse_permutation, temporal_permutation
from quantsparse_core.sparse.masks import band_keep, svg_masks
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

from random_weights import WAN_QK_GAINS, fill_random

TEXT = 4096
LATENT = (4, 16, 16)   # patch (1, 2, 2) -> grid (4, 8, 8): 256 video tokens, 16 blocks of 16
BLOCK_ = 16
STEPS = 6


def random_model(rng, preset, scale=0.05, qk_gain=None):
    """Random weights; qk_gain: the self-attention q/k RMSNorm gains (random_weights.fill_random)."""
    gains = () if qk_gain is None else WAN_QK_GAINS
    return fill_random(WanDiT(get_wan_preset(preset)), rng, gains, qk_gain or 1.0, scale)


def inputs(rng, config, batch=1, latent=LATENT):
    x = torch.randn(batch, config.in_dim, *latent, generator=rng)
    ctx = torch.randn(batch, 7, TEXT, generator=rng)
    clip = torch.randn(batch, 257, 1280, generator=rng) if config.model_type == "i2v" else None
    return x, ctx, clip


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def settings(**kw):
    base = dict(density=0.2, tau=2, svd_rank=0, order=2, warmup_steps=1, warmup_blocks=0, block=BLOCK_,
                n_rows=32, placement="exact", schedule="standard")
    base.update(kw)
    return SparseSettings(**base)


class Recorder:
    """attention_fn wrapper: runs `fn`, keeps (step, block, fn output, dense output) per call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, q, k, v, mask, call):
        assert call.txt_len == 0 and mask is None  # Wan's self-attention: video only, no key mask
        out = self.fn(q, k, v, mask, call)
        self.calls.append((call.step.index, call.block_index, out, dense_attention(q, k, v, mask, call)))
        return out


def trajectory(model, x, ctx, clip, steps=STEPS):
    """Euler steps of the dense model: the latents every attention function is fed (I2V: the noise
    channels step, the mask / image-latent channels after them stay)."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    xs = []
    with torch.no_grad():
        for i in range(steps):
            xs.append(x)
            v = model(x, sigmas[i:i + 1].expand(x.shape[0]) * 1000, ctx, clip_fea=clip, step=StepInfo(i, sigmas))
            n = v.shape[1]
            x = torch.cat([x[:, :n] + (sigmas[i + 1] - sigmas[i]) * v, x[:, n:]], 1)
    return sigmas, xs


def run(model, fn, sigmas, xs, ctx, clip):
    """Model outputs along the fixed trajectory with `fn` as self-attention, and its recorded calls."""
    rec = Recorder(fn)
    outs = []
    with torch.no_grad(), model.attention(rec):
        for i, x in enumerate(xs):
            outs.append(model(x, sigmas[i:i + 1].expand(x.shape[0]) * 1000, ctx, clip_fea=clip, step=StepInfo(i, sigmas)))
    return outs, rec.calls


def dense_outputs(model, sigmas, xs, ctx, clip):
    with torch.no_grad():
        return [model(x, sigmas[i:i + 1].expand(x.shape[0]) * 1000, ctx, clip_fea=clip, step=StepInfo(i, sigmas))
                for i, x in enumerate(xs)]


def test_masks_without_text_have_no_full_rows(rng):
    """txt_len 0: the band is the diagonal band alone (no always-kept row or column), the requested
    density is met, and SVG picks a kind per head on Wan's grid."""
    keep = band_keep(256, 0, 0.2, BLOCK_)
    assert not keep.all(1).any() and not keep.all(0).any()
    assert abs(keep.double().mean().item() - 0.2) < 1.0 / 16
    assert band_keep(256, 0, 0.01, BLOCK_).equal(torch.eye(16, dtype=torch.bool))  # the minimum: the diagonal
    q, k, v = (torch.randn(1, 2, 256, 32, generator=rng) for _ in range(3))
    m = svg_masks(q, k, v, None, 0, (4, 8, 8), 0.2, 32, BLOCK_)
    assert m.keep.shape == (2, 16, 16) and len(m.kinds) == 2 and abs(m.density() - 0.2) < 1.0 / 16


def test_block_sparse_without_text_matches_reference(rng):
    """txt_len 0 on a grid whose token count is not a multiple of the block (105 = 6 x 16 + 9): the
    block-sparse path equals softmax over the mask expanded to tokens, temporal heads in (y, x, t) order,
    computed here in float64."""
    grid = (3, 5, 7)
    q, k, v = (torch.randn(2, 2, 105, 32, generator=rng) for _ in range(3))
    m = svg_masks(q, k, v, None, 0, grid, 0.3, 32, BLOCK_)
    m = dataclasses.replace(m, kinds=["spatial", "temporal"])  # both orders, whatever SVG picked
    out = block_sparse_attention(q, k, v, None, m, 0, grid)
    blocks = torch.arange(105) // BLOCK_
    ref = []
    for h in range(2):
        perm = temporal_permutation(0, grid, 105) if m.permuted(h) else torch.arange(105)
        qh, kh, vh = (t[:, h, perm].double() for t in (q, k, v))
        scores = (qh @ kh.transpose(-1, -2) / 32 ** 0.5).masked_fill(~m.keep[h][blocks][:, blocks], float("-inf"))
        ref.append((scores.softmax(-1) @ vh)[:, inverse_permutation(perm)])
    ref = torch.stack(ref, 2).reshape(2, 105, 64)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("latent", [LATENT, (3, 9, 13)], ids=["blocks-full", "partial-block"])
def test_density_one_equals_dense_over_a_schedule(rng, latent):
    """(a) Every block visited: dense, refresh and reuse steps all give dense attention. The odd latent
    pads to grid (3, 5, 7): 105 tokens, the last block partial."""
    model = random_model(rng, "wan-test")
    x, ctx, clip = inputs(rng, model.config, latent=latent)
    sigmas, xs = trajectory(model, x, ctx, clip)
    fn = SSARAttention(settings(density=1.0))
    assert fn.plan(STEPS).kinds() == ["dense", "refresh", "reuse", "refresh", "reuse", "refresh"]
    outs, calls = run(model, fn, sigmas, xs, ctx, clip)
    worst = max((o - d).abs().max().item() for _, _, o, d in calls)
    out_err = max(rel(o, d) for o, d in zip(outs, dense_outputs(model, sigmas, xs, ctx, clip)))
    print(f"density 1.0: attention max abs error {worst:.2e}, model output relative error {out_err:.2e}")
    assert fn.stats["sparse"] > 0  # the reuse steps did run the block-sparse path
    assert worst < 1e-5 and out_err < 1e-5


@pytest.mark.parametrize("density", [0.15, 0.3])
def test_sparse_error_and_ssar_correction(rng, density):
    """(b) On reuse steps, plain block-sparse attention (same mask, no cache) differs from dense but stays
    bounded; SSAR's correction brings it closer to dense. Step 2 reuses a first-order correction (one
    refresh so far), step 4 the second-order one. Random weights with RMSNorm q/k gains 1 (see
    random_model), and the latent carries a fixed frame-constant signal (2 x noise std per channel and
    frame) so the tokens have the frame structure SVG's masks are for; without it the plain sparse error
    is ~0.6 (near-uniform rows lose most of their mass outside the band) and the claim still holds."""
    model = random_model(rng, "wan-test", qk_gain=1.0)
    x, ctx, clip = inputs(rng, model.config)
    x = x + 2.0 * torch.randn(1, x.shape[1], LATENT[0], 1, 1, generator=rng)  # frame-constant signal
    sigmas, xs = trajectory(model, x, ctx, clip)
    plain = SSARAttention(settings(density=density, order=0))
    ssar = SSARAttention(settings(density=density, order=2))
    out_plain, calls_plain = run(model, plain, sigmas, xs, ctx, clip)
    out_ssar, calls_ssar = run(model, ssar, sigmas, xs, ctx, clip)
    dense = dense_outputs(model, sigmas, xs, ctx, clip)
    kinds = ssar.plan(STEPS).kinds()
    reuse = [i for i, k in enumerate(kinds) if k == "reuse"]
    for i, k in enumerate(kinds):
        ep = [rel(o, d) for s, _, o, d in calls_plain if s == i]
        es = [rel(o, d) for s, _, o, d in calls_ssar if s == i]
        print(f"density {density} step {i} {k}: attention rel err plain {max(ep):.3e} ssar {max(es):.3e}; "
              f"output rel err plain {rel(out_plain[i], dense[i]):.3e} ssar {rel(out_ssar[i], dense[i]):.3e}")
        if k != "reuse":
            assert max(es) < 1e-5 and max(ep) < 1e-5  # dense and refresh steps output full attention
    for i in reuse:
        ep = [rel(o, d) for s, _, o, d in calls_plain if s == i]
        es = [rel(o, d) for s, _, o, d in calls_ssar if s == i]
        print(f"step {i}: worst ratio ssar/plain per call {max(e / p for e, p in zip(es, ep)):.3f}, "
              f"output {rel(out_ssar[i], dense[i]) / rel(out_plain[i], dense[i]):.3f}")
        assert min(ep) > 1e-3, "the sparse mask dropped nothing: the test would not measure anything"
        assert max(ep) < 0.5  # measured 0.13-0.29
        # measured over 10 seeds x 2 densities: worst ratio 0.51 per call, 0.47 at the output (step 4,
        # second order); about 0.2-0.3 at step 2 (first order)
        assert all(e < 0.7 * p for e, p in zip(es, ep)), (es, ep)
        assert rel(out_ssar[i], dense[i]) < 0.7 * rel(out_plain[i], dense[i])
    print(f"mask changes between refreshes (second order falls back to first): {ssar.stats['mask_changed']}")
    assert abs(ssar.effective_density() - (4 + 2 * density) / 6) < 0.05  # 1 dense + 3 refresh + 2 reuse steps


def test_w4a8_policy_quantizes_the_named_linears(rng):
    """(c) quantize_model(wan_policy): exactly the policy's linears become QuantLinear (cross-attention
    k / v / k_img / v_img weight-only), and the output stays close to float. Bound: absmax 4-bit
    per-channel rounding of Gaussian weights costs ~14% relative error per linear (step ~ 3.5 sigma / 7,
    uniform rounding noise), measured 0.15-0.2 at the output of 2 random blocks; 8-bit weights must be
    ~16x closer, which shows the error is the weights' rounding and not a wiring mistake."""
    model = random_model(rng, "wan-test")
    x, ctx, clip = inputs(rng, model.config, batch=2)
    t = torch.rand(2, generator=rng) * 1000
    with torch.no_grad():
        ref = model(x, t, ctx)
    w8 = quantize_model(copy.deepcopy(model), wan_policy(model, w_bits=8))
    policy = wan_policy(model)
    quantize_model(model, policy)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(quant) == set(policy) and len(policy) == 2 * 10  # self q k v o, cross q k v o, ffn 0 / 2; 2 blocks
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if n.startswith("blocks."))
    assert sum(m.a_bits == 16 for m in quant.values()) == 2 * 2  # cross_attn.k / .v (no k_img in T2V)
    for name, m in quant.items():
        assert (m.w_bits, m.a_bits) == (4, 16 if name.endswith(CONTEXT_SUFFIXES) else 8), name
    with torch.no_grad():
        out, out8 = model(x, t, ctx), w8(x, t, ctx)
    err, err8 = rel(out, ref), rel(out8, ref)
    print(f"fake-quant vs float: model output relative error W4A8 {err:.3e}, W8A8 {err8:.3e}")
    assert torch.isfinite(out).all() and 0.05 < err < 0.3
    assert err8 < err / 5


def test_quantized_sparse_i2v_runs(rng):
    """(d) wan-test-i2v with clip_fea, W4A8 + SSAR at 20% over a short schedule: finite, sparse steps
    taken, close to the quantized dense model."""
    model = random_model(rng, "wan-test-i2v")
    quantize_model(model, wan_policy(model))
    x, ctx, clip = inputs(rng, model.config)
    sigmas, xs = trajectory(model, x, ctx, clip, steps=4)
    fn = SSARAttention(settings(density=0.2, tau=2, warmup_steps=0))
    outs, calls = run(model, fn, sigmas, xs, ctx, clip)
    dense = dense_outputs(model, sigmas, xs, ctx, clip)
    errs = [rel(o, d) for o, d in zip(outs, dense)]
    print(f"i2v W4A8 + SSAR 20%: output relative error per step {[f'{e:.2e}' for e in errs]}")
    assert all(torch.isfinite(o).all() for o in outs)
    assert fn.stats["sparse"] == 2 * 2 and fn.stats["refresh"] == 2 * 2  # 2 blocks x (reuse at 1, 3; refresh at 0, 2)
    assert max(errs) < 0.05

"""Our HunyuanVideo DiT: shapes, hook, references for its numeric pieces, bad input."""
import math

import pytest
import torch

from quantsparse_core.models import (AttentionCall, HunyuanVideoDiT, config_from_state_dict,
                                     dense_attention, get_preset)
from quantsparse_core.models.layers import apply_rope, rope_table, timestep_embedding
from quantsparse_core.models.sampler import flow_sigmas, sample_euler
from quantsparse_core.models.weights import check_state_dict


def small_inputs(cfg, rng, frames=2, hw=8, txt=6, pad=2):
    x = torch.randn(1, cfg.in_channels, frames, hw, hw, generator=rng)
    ctx = torch.randn(1, txt, cfg.context_in_dim, generator=rng)
    y = torch.randn(1, 768, generator=rng)
    mask = torch.ones(1, txt, dtype=torch.long)
    mask[:, txt - pad:] = 0
    return x, ctx, y, mask


def randomize(model, rng):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    return model


def test_13b_preset_on_meta_matches_hunyuanvideo_size():
    model = HunyuanVideoDiT(get_preset("hunyuan-video-13b"), device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 12.821e9) / 12.821e9 < 1e-3, n
    cfg = config_from_state_dict(model.state_dict())
    assert cfg == get_preset("hunyuan-video-13b")


def test_timestep_embedding_matches_float64(rng):
    t = torch.rand(5, generator=rng) * 1000
    got = timestep_embedding(t, 256)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    ref = torch.cat([torch.cos(t.double()[:, None] * freqs), torch.sin(t.double()[:, None] * freqs)], -1)
    torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=0)  # fp32 args up to 1000 rad


def test_rope_matches_complex_rotation_reference(rng):
    axes, theta = (16, 56, 56), 256
    pos = torch.randint(0, 20, (1, 7, 3), generator=rng).float()
    x = torch.randn(1, 2, 7, 128, generator=rng)
    got = apply_rope(x, rope_table(pos, axes, theta))
    # Reference: complex multiply each adjacent pair by exp(i * pos_axis * theta^(-2j/dim)).
    angles = []
    for a, dim in enumerate(axes):
        j = torch.arange(dim // 2, dtype=torch.float64)
        angles.append(pos[0, :, a].double()[:, None] * theta ** (-2 * j / dim))
    ang = torch.cat(angles, -1)
    xc = torch.view_as_complex(x.double().reshape(1, 2, 7, 64, 2).contiguous())
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).reshape(1, 2, 7, 128)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_forward_shape_and_attention_hook_sees_every_block(rng):
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng)
    x, ctx, y, mask = small_inputs(cfg, rng)
    calls = []

    def spy(q, k, v, m, call: AttentionCall):
        calls.append((call.block_type, call.block_index, call.txt_len, call.grid, q.shape[2]))
        return dense_attention(q, k, v, m, call)

    with model.attention(spy):
        out = model(x, torch.tensor([700.0]), ctx, y, torch.tensor([6.0]), attention_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.attention_fn is dense_attention  # restored
    assert [c[:2] for c in calls] == [("refiner", 0), ("refiner", 1), ("double", 0), ("single", 0)]
    assert calls[2][2:] == (6, (2, 4, 4), 6 + 32)


def test_masked_text_tokens_do_not_change_the_output(rng):
    """Padding tokens (mask 0) must not influence video outputs; their values are arbitrary."""
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng)
    x, ctx, y, mask = small_inputs(cfg, rng)
    ctx2 = ctx.clone()
    ctx2[:, -2:] = torch.randn(1, 2, cfg.context_in_dim, generator=rng) * 5
    # The token refiner pools over all positions (as ComfyUI), so keep the sum equal.
    ctx2[:, -1] += ctx[:, -2:].sum(1) - ctx2[:, -2:].sum(1)
    t, g = torch.tensor([300.0]), torch.tensor([6.0])
    a = model(x, t, ctx, y, g, attention_mask=mask)
    b = model(x, t, ctx2, y, g, attention_mask=mask)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_prompt_mask_gives_finite_output_equal_to_its_finite_float_form(rng, dtype):
    """An all-padding text mask (the empty prompt) must not turn the joint attention into NaN (with
    -finfo.max the refiner's mask + its transpose is -inf everywhere); a float mask with -inf is the same."""
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng).to(dtype)
    x, ctx, y, mask = small_inputs(cfg, rng)
    x, ctx, y = x.to(dtype), ctx.to(dtype), y.to(dtype)
    empty = torch.zeros_like(mask)
    t, g = torch.tensor([300.0]), torch.tensor([6.0])
    out = model(x, t, ctx, y, g, attention_mask=empty)
    assert torch.isfinite(out).all()
    as_float = torch.full(mask.shape, float("-inf"))
    torch.testing.assert_close(model(x, t, ctx, y, g, attention_mask=as_float), out, rtol=0, atol=0)
    # real prompts are unchanged by the floor: -1e4 and -inf padding give the same output
    pad = torch.where(mask.bool(), 0.0, float("-inf"))
    torch.testing.assert_close(model(x, t, ctx, y, g, attention_mask=pad), model(x, t, ctx, y, g, attention_mask=mask),
                               rtol=0, atol=0)


def test_unpatchify_inverts_patch_layout(rng):
    model = HunyuanVideoDiT(get_preset("test"), device="meta")
    x = torch.randn(2, 16, 3, 4, 6, generator=rng)
    # Patchify by hand in the channel-major order the final layer emits.
    tokens = x.reshape(2, 16, 3, 1, 2, 2, 3, 2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 3 * 2 * 3, 64)
    torch.testing.assert_close(model.unpatchify(tokens, (3, 2, 3)), x, atol=0, rtol=0)


def test_sampler_sigmas_and_step_hook(rng):
    sig = flow_sigmas(10, 7.0)
    t = torch.linspace(1, 0, 11, dtype=torch.float64)
    torch.testing.assert_close(sig.double(), 7 * t / (1 + 6 * t), atol=1e-7, rtol=0)
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng)
    x, ctx, y, mask = small_inputs(cfg, rng)
    seen = []

    def spy(q, k, v, m, call):
        seen.append(call.step.index if call.step else None)
        return dense_attention(q, k, v, m, call)

    with model.attention(spy):
        sample_euler(model, x, ctx, y, flow_sigmas(3), attention_mask=mask)
    assert seen == [0] * 4 + [1] * 4 + [2] * 4


def test_euler_step_is_exact_for_a_constant_velocity_field(rng):
    """With v(x) = noise - x0 the flow is a straight line: Euler lands exactly on x0."""
    x0 = torch.randn(1, 16, 1, 4, 4, generator=rng)
    noise = torch.randn_like(x0)

    class Straight(torch.nn.Module):
        def forward(self, x, t, *a, **k):
            return noise - x0

    out = sample_euler(Straight(), noise, torch.zeros(1, 1, 1), None, flow_sigmas(7))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", ["hw", "channels", "context"])
def test_bad_inputs_have_clear_errors(rng, bad):
    cfg = get_preset("test")
    model = HunyuanVideoDiT(cfg)
    x, ctx, y, mask = small_inputs(cfg, rng)
    if bad == "hw":
        x = torch.randn(1, 16, 2, 7, 8)
        match = "not divisible by the patch size"
    elif bad == "channels":
        x = torch.randn(1, 4, 2, 8, 8)
        match = "channels"
    else:
        ctx = torch.randn(1, 6, 99)
        match = "context must be"
    with pytest.raises(ValueError, match=match):
        model(x, torch.tensor([1.0]), ctx, y)


def test_unknown_preset_and_foreign_state_dict():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="not a HunyuanVideo"):
        config_from_state_dict({"model.conv_in.weight": torch.zeros(1)})
    model = HunyuanVideoDiT(get_preset("test"), device="meta")
    sd = dict(model.state_dict())
    sd.pop("final_layer.linear.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing keys.*1 unexpected keys"):
        check_state_dict(model, sd)


def test_batched_text_masks_equal_one_by_one(rng):
    """Each batch entry may have its own padding; the batch equals running entries separately."""
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng)
    x = torch.randn(2, 16, 2, 8, 8, generator=rng)
    ctx = torch.randn(2, 6, cfg.context_in_dim, generator=rng)
    y = torch.randn(2, 768, generator=rng)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    t, g = torch.tensor([800.0, 120.0]), torch.tensor([6.0, 6.0])
    both = model(x, t, ctx, y, g, attention_mask=mask)
    for i in range(2):
        one = model(x[i:i + 1], t[i:i + 1], ctx[i:i + 1], y[i:i + 1], g[i:i + 1], attention_mask=mask[i:i + 1])
        torch.testing.assert_close(both[i:i + 1], one, atol=1e-5, rtol=1e-5)

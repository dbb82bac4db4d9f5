"""Our Wan DiT on its own (no ComfyUI): presets, reading configs back from keys, float32 against a float64
run of the same weights, the self-attention hook, per-frame timesteps, storage and refused inputs.
Equality with ComfyUI's WanModel is tests/test_comfy_wan.py."""
import copy
import dataclasses

import pytest
import torch

from quantsparse_core.models.attention import dense_attention
from quantsparse_core.models.wan import (WAN_PRESETS, WanConfig, WanDiT, get_wan_preset,
                                         wan_config_from_state_dict)
from quantsparse_core.models.wan_storage import wan_policy, wan_storage

TEXT = 4096


def random_model(rng, preset, scale=0.05, dtype=torch.float32):
    model = WanDiT(preset if isinstance(preset, WanConfig) else get_wan_preset(preset), dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * scale)
    return model.eval()


def inputs(rng, config, batch=2, latent=(3, 9, 13), ctx_len=7):
    x = torch.randn(batch, config.in_dim, *latent, generator=rng)
    t = torch.rand(batch, generator=rng) * 1000
    ctx = torch.randn(batch, ctx_len, TEXT, generator=rng)
    clip = torch.randn(batch, 257, 1280, generator=rng) if config.model_type == "i2v" else None
    return x, t, ctx, clip


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", sorted(WAN_PRESETS))
def test_preset_builds_on_meta_and_reads_back(name):
    config = get_wan_preset(name)
    sd = WanDiT(config, device="meta").state_dict()
    assert wan_config_from_state_dict(sd) == config
    assert WanConfig.from_dict(config.to_dict()) == config


def test_real_model_parameter_counts():
    """Published sizes: Wan2.1 1.3B, 14B and Wan2.2 TI2V 5B."""
    counts = {n: sum(p.numel() for p in WanDiT(get_wan_preset(n), device="meta").parameters()) / 1e9
              for n in ("wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b")}
    assert 1.3 < counts["wan2.1-1.3b"] < 1.5
    assert 14.0 < counts["wan2.1-14b"] < 14.5
    assert 4.9 < counts["wan2.2-5b"] < 5.1


@pytest.mark.parametrize("preset", ["wan-test", "wan-test-i2v"])
@pytest.mark.parametrize("latent", [(3, 8, 12), (3, 9, 13)], ids=["even", "odd-padded"])
def test_float32_matches_float64(rng, preset, latent):
    model = random_model(rng, preset)
    model64 = copy.deepcopy(model).double()
    x, t, ctx, clip = inputs(rng, model.config, latent=latent)
    with torch.no_grad():
        out = model(x, t, ctx, clip_fea=clip)
        ref = model64(x.double(), t.double(), ctx.double(), clip_fea=None if clip is None else clip.double())
    assert out.shape == (2, model.config.out_dim, *latent) and out.dtype == torch.float32
    assert ref.dtype == torch.float64
    print(f"{preset} {latent}: float32 vs float64 relative error {rel(out, ref):.2e}")
    assert rel(out, ref) < 1e-5, f"float32 vs float64 relative error {rel(out, ref):.2e}"


def test_bfloat16_close_to_float64(rng):
    model = random_model(rng, "wan-test")
    model16 = WanDiT(model.config, dtype=torch.bfloat16)
    model16.load_state_dict(model.state_dict())
    model64 = copy.deepcopy(model16).double()  # the same bf16-rounded weights
    assert model16.patch_embedding.weight.dtype == torch.float32  # kept in fp32, as ComfyUI does
    x, t, ctx, _ = inputs(rng, model.config)
    with torch.no_grad():
        out = model16(x.bfloat16(), t, ctx.bfloat16())
        ref = model64(x.bfloat16().double(), t.double(), ctx.bfloat16().double())
    assert out.dtype == torch.bfloat16
    print(f"bf16 vs float64 relative error {rel(out, ref):.2e}")
    assert rel(out, ref) < 3e-2, f"bf16 vs float64 relative error {rel(out, ref):.2e}"


def test_self_attention_goes_through_the_hook(rng):
    model = random_model(rng, "wan-test")
    x, t, ctx, _ = inputs(rng, model.config)
    calls = []

    def recording(q, k, v, mask, call):
        calls.append((call, q.shape, mask))
        return dense_attention(q, k, v, mask, call)

    with torch.no_grad():
        base = model(x, t, ctx)
        with model.attention(recording):
            same = model(x, t, ctx)
        with model.attention(lambda q, k, v, m, c: 0.5 * dense_attention(q, k, v, m, c)):
            changed = model(x, t, ctx)
    assert model.attention_fn is dense_attention
    torch.testing.assert_close(same, base, rtol=0, atol=0)
    assert rel(changed, base) > 1e-3
    n = model.config.num_layers
    assert [c.block_index for c, _, _ in calls] == list(range(n))
    for call, qshape, mask in calls:
        assert (call.block_type, call.num_blocks, call.txt_len, call.grid) == ("double", n, 0, (3, 5, 7))
        assert qshape == (2, model.config.num_heads, 3 * 5 * 7, model.config.head_dim) and mask is None


def test_per_frame_timesteps(rng):
    """[B, T] timesteps: equal values per frame give the [B] result; different ones act frame by frame."""
    model = random_model(rng, "wan-test")
    x, t, ctx, _ = inputs(rng, model.config, latent=(3, 8, 12))
    per_frame = t[:, None].expand(-1, 3).clone()
    with torch.no_grad():
        base = model(x, t, ctx)
        same = model(x, per_frame, ctx)
        per_frame[:, 0] = 0.0  # Wan 2.2 TI2V: the conditioning frame is clean
        mixed = model(x, per_frame, ctx)
    assert rel(same, base) < 1e-6
    assert rel(mixed, base) > 1e-3


def test_t2v_ignores_clip_tokens_like_comfyui(rng):
    model = random_model(rng, "wan-test")
    x, t, ctx, _ = inputs(rng, model.config)
    with torch.no_grad():
        a = model(x, t, ctx)
        b = model(x, t, ctx, clip_fea=torch.randn(2, 257, 1280, generator=rng))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_i2v_image_tokens_matter(rng):
    model = random_model(rng, "wan-test-i2v")
    x, t, ctx, clip = inputs(rng, model.config)
    with torch.no_grad():
        a = model(x, t, ctx, clip_fea=clip)
        b = model(x, t, ctx, clip_fea=torch.randn(clip.shape, generator=rng))
    # Same weights and latent, so the runs are bitwise equal unless the image tokens reach the output; their
    # share is small at random weights (one LayerNorm'd attention summed with the text one).
    assert rel(a, b) > 1e-4


def test_storage_14b_w4a8_at_most_029_of_bf16():
    config = get_wan_preset("wan2.1-14b")
    s = wan_storage(config)
    d, f, n = config.dim, config.ffn_dim, config.num_layers
    # Hand count: 8 d x d attention linears and two d x f FFN linears per block, int4 (half a byte) plus one
    # fp32 scale per output channel.
    assert s["quantized"] == n * ((8 * d * d + 2 * d * f) // 2 + 4 * (9 * d + f))
    assert s["fraction"] <= 0.29, f"Wan2.1-14B W4A8 is {s['fraction']:.4f} of bf16"
    print(f"Wan2.1-14B W4A8: {s['total'] / 1e9:.2f} GB of {s['bf16_total'] / 1e9:.2f} GB bf16 = {s['fraction']:.4f}x")


def test_policy_quantizes_block_linears_only():
    model = WanDiT(get_wan_preset("wan-test-i2v"), device="meta")
    policy = wan_policy(model)
    assert all(name.startswith("blocks.") for name in policy)
    assert len(policy) == model.config.num_layers * 12  # q k v o, q k v o k_img v_img, ffn.0 ffn.2
    assert policy["blocks.0.self_attn.q"].a_bits == 8 and policy["blocks.0.ffn.2"].a_bits == 8
    assert policy["blocks.1.cross_attn.k_img"].a_bits == 16


def test_bad_inputs_refused(rng):
    model = random_model(rng, "wan-test")
    i2v = random_model(rng, "wan-test-i2v")
    x, t, ctx, _ = inputs(rng, model.config)
    cases = [
        (model, (x[:, :4], t, ctx), {}, "takes 16"),
        (i2v, (x, t, ctx), {"clip_fea": torch.zeros(2, 257, 1280)}, "concatenate the mask"),
        (model, (x[0], t, ctx), {}, "must be \\[batch, channels"),
        (model, (x, t, ctx[..., :64]), {}, "context must be"),
        (model, (x, t, ctx[:1]), {}, "context must be"),
        (model, (x, t[:1], ctx), {}, "timestep must be"),
        (model, (x, torch.zeros(2, 2), ctx), {}, "per latent frame"),
        (i2v, (torch.zeros(2, 36, 3, 8, 12), t, ctx), {}, "needs clip_fea"),
        (i2v, (torch.zeros(2, 36, 3, 8, 12), t, ctx), {"clip_fea": torch.zeros(2, 257, 1024)}, "clip_fea must be"),
    ]
    for m, args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            m(*args, **kwargs)


def test_bad_configs_and_state_dicts_refused():
    with pytest.raises(ValueError, match="unknown Wan preset"):
        get_wan_preset("wan3")
    with pytest.raises(ValueError, match="model_type"):
        WanConfig(model_type="vace")
    with pytest.raises(ValueError, match="needs model_type 'i2v'"):
        WanConfig(flf_pos_embed_token_number=514)
    with pytest.raises(ValueError, match="unknown Wan config fields"):
        WanConfig.from_dict({"dim": 256, "depth": 3})
    sd = WanDiT(get_wan_preset("wan-test"), device="meta").state_dict()
    with pytest.raises(ValueError, match="not a Wan transformer"):
        wan_config_from_state_dict({"img_in.proj.weight": torch.empty(1)})
    with pytest.raises(ValueError, match="strip it"):
        wan_config_from_state_dict({"model.diffusion_model." + k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match="Wan VACE"):
        wan_config_from_state_dict({**sd, "vace_patch_embedding.weight": torch.empty(1)})
    with pytest.raises(ValueError, match="missing \\['blocks.0.cross_attn.o.bias'\\]"):
        wan_config_from_state_dict({k: v for k, v in sd.items() if k != "blocks.0.cross_attn.o.bias"})
    with pytest.raises(ValueError, match="wrong shape \\['blocks.1.ffn.2.weight'\\]"):
        wan_config_from_state_dict({**sd, "blocks.1.ffn.2.weight": torch.empty(256, 300, device="meta")})
    with pytest.raises(ValueError, match="numbered 0..n-1"):
        wan_config_from_state_dict({**sd, "blocks.5.ffn.0.weight": sd["blocks.0.ffn.0.weight"]})
    odd = dataclasses.replace(get_wan_preset("wan-test"), dim=320, num_heads=2)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        wan_config_from_state_dict(WanDiT(odd, device="meta").state_dict())

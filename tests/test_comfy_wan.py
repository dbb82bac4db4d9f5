"""Our Wan DiT equals ComfyUI's WanModel: same random weights, same inputs, same outputs (float32, relative
error <= 1e-5), and ComfyUI's own detection names our state dicts as the right Wan model.

Runs only with COMFYUI_PATH set (see tests/comfy_env.py)."""
import dataclasses

import pytest
import torch

from quantsparse_core.models.wan import WAN_PRESETS, WanConfig, WanDiT, get_wan_preset

from comfy_env import comfyui_version, require_comfyui

# Small shapes of the variants the presets do not cover: Wan 2.2 TI2V-5B (48-channel latent) and FLF2V
# (learned positions for the two images' 2 x 257 CLIP tokens).
EXTRA = {
    "wan-test-ti2v": dataclasses.replace(get_wan_preset("wan-test"), in_dim=48, out_dim=48),
    "wan-test-flf": dataclasses.replace(get_wan_preset("wan-test-i2v"), flf_pos_embed_token_number=514),
}


def config_of(name) -> WanConfig:
    return EXTRA[name] if name in EXTRA else get_wan_preset(name)


def build_pair(rng, name):
    root = require_comfyui()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    ours = WanDiT(config_of(name))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.1)
    sd = ours.state_dict()
    dit_config = comfy.model_detection.detect_unet_config(sd, "")
    assert dit_config.pop("image_model") == "wan2.1"
    theirs = WanModel(operations=comfy.ops.disable_weight_init, **dit_config)
    theirs.load_state_dict(sd, strict=True)
    return ours.eval(), theirs.eval(), comfyui_version(root)


CASES = {
    # name: (model, batch, latent [T, H, W], per-frame timesteps, CLIP tokens)
    "t2v-batch2": ("wan-test", 2, (3, 8, 12), False, 0),
    "t2v-odd-grid-3x5x7": ("wan-test", 1, (3, 9, 13), False, 0),  # padded circularly to 10 x 14
    "i2v-batch2": ("wan-test-i2v", 2, (3, 8, 12), False, 257),
    "i2v-odd-grid-3x5x7": ("wan-test-i2v", 2, (3, 9, 13), False, 257),
    "flf2v": ("wan-test-flf", 1, (2, 6, 8), False, 514),
    "ti2v-per-frame-timesteps": ("wan-test-ti2v", 2, (3, 9, 12), True, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_equal_comfyui(rng, case):
    name, b, latent, per_frame, clip_len = CASES[case]
    ours, theirs, version = build_pair(rng, name)
    c = ours.config
    x = torch.randn(b, c.in_dim, *latent, generator=rng)
    t = torch.rand(b, generator=rng) * 1000
    if per_frame:
        t = t[:, None].repeat(1, latent[0])
        t[:, 0] = 0.0  # TI2V: the conditioning frame is clean (ComfyUI's WAN22.process_timestep)
    ctx = torch.randn(b, 9, c.text_dim, generator=rng)
    clip = torch.randn(b, clip_len, 1280, generator=rng) if clip_len else None
    with torch.no_grad():
        a = ours(x, t, ctx, clip_fea=clip)
        ref = theirs(x, t, ctx, clip_fea=clip)
    assert a.shape == ref.shape == (b, c.out_dim, *latent)
    rel = ((a - ref).norm() / ref.norm()).item()
    print(f"{case}: relative difference to ComfyUI {version}: {rel:.2e}")
    assert rel <= 1e-5, f"relative difference {rel:.2e} against ComfyUI {version}"


@pytest.mark.parametrize("name", sorted(WAN_PRESETS) + sorted(EXTRA))
def test_comfyui_detection_names_our_model(name):
    """ComfyUI's detection reads our keys as the Wan model the config says, with its architecture."""
    require_comfyui()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    config = config_of(name)
    sd = WanDiT(config, device="meta").state_dict()
    detected = comfy.model_detection.detect_unet_config(sd, "")
    assert detected["image_model"] == "wan2.1"
    for field in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "model_type", "freq_dim", "eps"):
        assert detected[field] == getattr(config, field), field
    assert tuple(detected["patch_size"]) == tuple(config.patch_size)
    assert detected.get("flf_pos_embed_token_number") == config.flf_pos_embed_token_number
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(model_config).__name__ == config.comfy_model
    # The architecture ComfyUI builds from that detection has exactly our keys and shapes.
    detected.pop("image_model")
    theirs = WanModel(operations=comfy.ops.disable_weight_init, device="meta", **detected)
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_comfyui_stock_loader_reads_our_file(rng, tmp_path):
    """A file saved by us loads through comfy.sd.load_diffusion_model as a Wan 2.1 I2V model and computes the
    same output."""
    require_comfyui()
    import comfy.sd
    from comfy.ldm.wan.model import WanModel

    from quantsparse_core.models.weights import atomic_save_safetensors

    ours = WanDiT(get_wan_preset("wan-test-i2v"))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.1)
    path = tmp_path / "wan.safetensors"
    atomic_save_safetensors(ours.state_dict(), path)
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    theirs = patcher.model.diffusion_model
    assert isinstance(theirs, WanModel) and type(patcher.model).__name__ == "WAN21"
    x = torch.randn(1, 36, 2, 8, 8, generator=rng)
    ctx = torch.randn(1, 5, 4096, generator=rng)
    clip = torch.randn(1, 257, 1280, generator=rng)
    t = torch.tensor([600.0])
    with torch.no_grad():
        a = ours(x, t, ctx, clip_fea=clip)
        b = theirs(x, t, ctx, clip_fea=clip)
    assert ((a - b.to(a.dtype)).norm() / a.norm()).item() <= 1e-5

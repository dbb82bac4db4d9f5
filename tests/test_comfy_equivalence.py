"""Our DiT equals ComfyUI's HunyuanVideo: same random weights, same inputs, same outputs.

Runs only with COMFYUI_PATH set (see README). ComfyUI's own model detection reads the config from
our state dict, which also proves its stock loader derives the same architecture.
"""
import pytest
import torch

from quantsparse_core.models import HunyuanVideoDiT, get_preset

from comfy_env import comfyui_version, require_comfyui


def build_pair(rng, preset="test"):
    root = require_comfyui()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    ours = HunyuanVideoDiT(get_preset(preset))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    sd = ours.state_dict()
    dit_config = comfy.model_detection.detect_unet_config(sd, "")
    assert dit_config["image_model"] == "hunyuan_video"
    dit_config.pop("image_model")
    theirs = HunyuanVideo(operations=comfy.ops.disable_weight_init, **dit_config)
    theirs.load_state_dict(sd, strict=True)
    return ours.eval(), theirs.eval(), comfyui_version(root)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no-text-mask", "text-mask"])
def test_outputs_equal_comfyui(rng, use_mask):
    ours, theirs, version = build_pair(rng)
    print(f"ComfyUI {version}")
    # ComfyUI's text mask is [1, 1, L]: one mask for the batch, so the masked case uses batch 1.
    b = 1 if use_mask else 2
    x = torch.randn(b, 16, 3, 8, 12, generator=rng)
    ctx = torch.randn(b, 7, 32, generator=rng)
    y = torch.randn(b, 768, generator=rng)
    t = torch.tensor([917.0, 250.0])[:b]
    g = torch.tensor([6.0, 3.5])[:b]
    mask = None
    if use_mask:
        mask = torch.ones(1, 7, dtype=torch.long)
        mask[0, 4:] = 0
    with torch.no_grad():
        a = ours(x, t, ctx, y, g, attention_mask=mask)
        b = theirs(x, t, ctx, y=y, guidance=g, attention_mask=mask)
    assert a.shape == b.shape
    rel = ((a - b).norm() / b.norm()).item()
    print(f"relative difference to ComfyUI {version}: {rel:.2e}")
    assert rel < 1e-5, f"relative difference {rel:.2e} against ComfyUI {version}"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_state_dict_keys_and_shapes_equal_comfyui(rng):
    ours, theirs, _ = build_pair(rng)
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert a == b


def test_13b_preset_keys_and_shapes_equal_comfyui_on_meta():
    require_comfyui()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    ours = HunyuanVideoDiT(get_preset("hunyuan-video-13b"), device="meta")
    sd = ours.state_dict()
    dit_config = comfy.model_detection.detect_unet_config(sd, "")
    dit_config.pop("image_model")
    theirs = HunyuanVideo(operations=comfy.ops.disable_weight_init, device="meta", **dit_config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_comfyui_stock_loader_reads_our_file(rng, tmp_path):
    """A file saved by us loads through comfy.sd.load_diffusion_model as a HunyuanVideo model."""
    require_comfyui()
    import comfy.sd
    from comfy.ldm.hunyuan_video.model import HunyuanVideo

    from quantsparse_core.models.weights import atomic_save_safetensors

    ours = HunyuanVideoDiT(get_preset("test"))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    path = tmp_path / "dit.safetensors"
    atomic_save_safetensors(ours.state_dict(), path)
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    theirs = patcher.model.diffusion_model
    assert isinstance(theirs, HunyuanVideo)
    assert type(patcher.model).__name__ == "HunyuanVideo"
    x = torch.randn(1, 16, 2, 8, 8, generator=rng)
    ctx = torch.randn(1, 5, 32, generator=rng)
    y = torch.randn(1, 768, generator=rng)
    t, g = torch.tensor([600.0]), torch.tensor([6.0])
    with torch.no_grad():
        a = ours(x, t, ctx, y, g)
        b = theirs(x, t, ctx, y=y, guidance=g)
    torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-4)

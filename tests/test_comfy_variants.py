"""Our DiT equals ComfyUI's HunyuanVideo class on the other family members (issue 17): 1.0 I2V
(33 input channels, reference-latent tokens, with and without guidance embedding) and HunyuanVideo 1.5
(byT5 glyph tokens, image tokens, cond_type_embedding, meanflow). Same random weights, same inputs.

Runs only with COMFYUI_PATH set. ComfyUI's own detection reads the configuration from our state dicts
and names the model class (supported_models), which also proves its stock loader builds the same model.
"""
import dataclasses

import pytest
import torch

from quantsparse_core.models import HunyuanVideoDiT, config_from_state_dict, get_preset

from comfy_env import comfyui_version, require_comfyui

REL_TOL = 1e-5  # issue 17: relative error at most 1e-5 in float32


def _random_(model, rng):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    return model


def comfy_class_and_config(sd):
    """(ComfyUI's detected dit config, the supported_models class name it picks) for our state dict."""
    import comfy.model_detection
    dit_config = comfy.model_detection.detect_unet_config(sd, "")
    assert dit_config is not None and dit_config.pop("image_model") == "hunyuan_video"
    model_config = comfy.model_detection.model_config_from_unet(sd, "")
    return dit_config, type(model_config).__name__


def build_pair(rng, config):
    """Our model with random weights and ComfyUI's class built from what its detection reads, same weights."""
    require_comfyui()
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    ours = _random_(HunyuanVideoDiT(config), rng)
    sd = ours.state_dict()
    dit_config, class_name = comfy_class_and_config(sd)
    theirs = HunyuanVideo(operations=comfy.ops.disable_weight_init, **dit_config)
    theirs.load_state_dict(sd, strict=True)
    return ours.eval(), theirs.eval(), class_name


def assert_equal_outputs(a, b, what):
    version = comfyui_version(require_comfyui())
    assert a.shape == b.shape
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{what}: relative difference to ComfyUI {version}: {rel:.2e}")
    assert rel <= REL_TOL, f"{what}: relative difference {rel:.2e} against ComfyUI {version}"


def _text(rng, b, n=7, width=32, masked=False):
    ctx = torch.randn(b, n, width, generator=rng)
    mask = None
    if masked:  # ComfyUI's text mask is [1, 1, L]: one mask for the batch, so masked cases use batch 1
        assert b == 1
        mask = torch.ones(1, n, dtype=torch.long)
        mask[0, n - 3:] = 0
    return ctx, mask


# ---- HunyuanVideo 1.0 I2V ----------------------------------------------------------------------------------
I2V_CASES = {
    # name: (guidance embedding, batch, latent (T, H, W), reference latent (T, H, W) or None, text mask)
    "ref-odd-grid-batch2": (False, 2, (3, 10, 14), (1, 10, 14), False),
    "ref-other-size-guidance": (True, 2, (2, 6, 10), (1, 8, 4), False),
    "ref-two-frames-mask": (False, 1, (2, 6, 6), (2, 6, 6), True),
    "no-ref-mask-guidance": (True, 1, (3, 6, 10), None, True),
}


@pytest.mark.parametrize("case", list(I2V_CASES))
def test_i2v_outputs_equal_comfyui(rng, case):
    guidance_embed, b, shape, ref_shape, masked = I2V_CASES[case]
    config = dataclasses.replace(get_preset("test-i2v"), guidance_embed=guidance_embed)
    ours, theirs, class_name = build_pair(rng, config)
    assert class_name == "HunyuanVideoI2V"
    # In ComfyUI the 33 channels are the noisy latent + model_base's concat_cond (image latent + mask).
    x = torch.randn(b, 33, *shape, generator=rng)
    ref = None if ref_shape is None else torch.randn(b, 33, *ref_shape, generator=rng)
    ctx, mask = _text(rng, b, masked=masked)
    y = torch.randn(b, 768, generator=rng)
    t = torch.tensor([917.0, 250.0])[:b]
    g = torch.tensor([6.0, 3.5])[:b] if guidance_embed else None
    with torch.no_grad():
        a = ours(x, t, ctx, y, g, attention_mask=mask, ref_latent=ref)
        c = per_sample(theirs, b, x, t, ctx, y=y, guidance=g, attention_mask=mask, ref_latent=ref)
    assert_equal_outputs(a, c, f"1.0 I2V {case}")


def per_sample(model, b, *args, **kwargs):
    """ComfyUI's output, one batch entry at a time where it needs that: its reference-latent path writes into
    a batch-expanded view (img_ids via einops.repeat), which fails for batch > 1."""
    if kwargs.get("ref_latent") is None or b == 1:
        return model(*args, **kwargs)
    pick = lambda v, i: v[i:i + 1] if isinstance(v, torch.Tensor) and v.shape[0] == b else v  # noqa: E731
    return torch.cat([model(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
                      for i in range(b)])


def test_ref_latent_on_t2v_model_equals_comfyui(rng):
    """ComfyUI's HunyuanImageToVideo "custom" guidance gives a 16-channel model a reference latent."""
    ours, theirs, class_name = build_pair(rng, get_preset("test"))
    assert class_name == "HunyuanVideo"
    x, ref = torch.randn(2, 16, 3, 6, 8, generator=rng), torch.randn(2, 16, 1, 6, 8, generator=rng)
    ctx, _ = _text(rng, 2)
    y, t, g = torch.randn(2, 768, generator=rng), torch.tensor([700.0, 80.0]), torch.tensor([6.0, 6.0])
    with torch.no_grad():
        a = ours(x, t, ctx, y, g, ref_latent=ref)
        c = per_sample(theirs, 2, x, t, ctx, y=y, guidance=g, ref_latent=ref)
    assert_equal_outputs(a, c, "1.0 T2V + ref_latent")


# ---- HunyuanVideo 1.5 -----------------------------------------------------------------------------------------
V15_CASES = {
    # name: (batch, latent (T, H, W), byT5 tokens, image tokens, text mask)
    "t2v-byt5-odd-grid-batch2": (2, (3, 5, 7), 4, 0, False),
    "t2v-no-byt5-mask": (1, (2, 3, 5), 0, 0, True),
    "i2v-vision-byt5-batch2": (2, (2, 5, 3), 3, 5, False),
    "i2v-vision-only": (1, (1, 4, 6), 0, 6, False),
}


def v15_inputs(rng, b, shape, n_byt5, n_vision, masked):
    x = torch.randn(b, 65, *shape, generator=rng)  # 32 noisy + 32 image latent (zeros on T2V) + 1 mask
    ctx, mask = _text(rng, b, masked=masked)
    byt5 = torch.randn(b, n_byt5, 1472, generator=rng) if n_byt5 else None
    vision = torch.randn(b, n_vision, 1152, generator=rng) if n_vision else None
    return x, ctx, mask, byt5, vision


@pytest.mark.parametrize("case", list(V15_CASES))
def test_v15_outputs_equal_comfyui(rng, case):
    b, shape, n_byt5, n_vision, masked = V15_CASES[case]
    ours, theirs, class_name = build_pair(rng, get_preset("test-1.5"))
    assert class_name == "HunyuanVideo15"
    x, ctx, mask, byt5, vision = v15_inputs(rng, b, shape, n_byt5, n_vision, masked)
    t = torch.tensor([917.0, 250.0])[:b]
    with torch.no_grad():
        a = ours(x, t, ctx, attention_mask=mask, txt_byt5=byt5, clip_fea=vision)
        c = theirs(x, t, ctx, attention_mask=mask, txt_byt5=byt5, clip_fea=vision)
    assert_equal_outputs(a, c, f"1.5 {case}")


@pytest.mark.parametrize("preset", ["test-1.5", "test"], ids=["1.5-sum", "1.0-average"])
def test_meanflow_time_r_equals_comfyui(rng, preset):
    """time_r_in embeds the next sigma of the schedule; ComfyUI finds it from transformer_options."""
    ours, theirs, _ = build_pair(rng, dataclasses.replace(get_preset(preset), meanflow=True))
    cfg = ours.config
    p = cfg.patch_size[1]
    x = torch.randn(1, cfg.in_channels, 2, 3 * p, 2 * p, generator=rng)
    ctx, _ = _text(rng, 1)
    kw_ours, kw_theirs = {}, {}
    if cfg.vec_in_dim:
        y = torch.randn(1, 768, generator=rng)
        kw_ours.update(y=y, guidance=torch.tensor([6.0]))
        kw_theirs.update(y=y, guidance=torch.tensor([6.0]))
    sigmas = torch.tensor([1.0, 0.8123, 0.4567, 0.0])
    options = {"sigmas": sigmas[1:2], "sample_sigmas": sigmas}
    t = sigmas[1:2] * 1000
    with torch.no_grad():
        a = ours(x, t, ctx, timestep_r=sigmas[2:3], **kw_ours)
        c = theirs(x, t, ctx, transformer_options=options, **kw_theirs)
        without = ours(x, t, ctx, **kw_ours)
    assert_equal_outputs(a, c, f"{preset} meanflow")
    assert ((a - without).norm() / a.norm()).item() > 1e-3, "timestep_r had no effect"


# ---- state dicts both ways, detection, the stock loader ----------------------------------------------------------
DETECTED = {
    # preset: (ComfyUI supported_models class, detected config entries)
    "test-i2v": ("HunyuanVideoI2V", dict(in_channels=33, out_channels=16, patch_size=[1, 2, 2], guidance_embed=False,
                                         vec_in_dim=768, byt5=False, vision_in_dim=None,
                                         use_cond_type_embedding=False, depth=1, depth_single_blocks=1)),
    "test-1.5": ("HunyuanVideo15", dict(in_channels=65, out_channels=32, patch_size=[1, 1, 1], guidance_embed=False,
                                        vec_in_dim=None, byt5=True, vision_in_dim=1152, use_cond_type_embedding=True,
                                        meanflow=False, depth=2, depth_single_blocks=0, hidden_size=256, num_heads=2)),
    "hunyuan-video-i2v-13b": ("HunyuanVideoI2V", dict(in_channels=33, hidden_size=3072, num_heads=24, depth=20,
                                                      depth_single_blocks=40, context_in_dim=4096)),
    "hunyuan-video-1.5-8b": ("HunyuanVideo15", dict(in_channels=65, out_channels=32, patch_size=[1, 1, 1],
                                                    hidden_size=2048, num_heads=16, depth=54, depth_single_blocks=0,
                                                    context_in_dim=3584, vec_in_dim=None, guidance_embed=False,
                                                    byt5=True, vision_in_dim=1152, use_cond_type_embedding=True)),
}


@pytest.mark.parametrize("preset", list(DETECTED))
def test_comfyui_detects_our_state_dict_as_the_right_model(preset):
    """On the meta device: ComfyUI's detection names the variant, and its class has our keys and shapes."""
    require_comfyui()
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    ours = HunyuanVideoDiT(get_preset(preset), device="meta")
    sd = ours.state_dict()
    dit_config, class_name = comfy_class_and_config(sd)
    expected_class, expected = DETECTED[preset]
    assert class_name == expected_class
    assert {k: dit_config[k] for k in expected} == expected
    theirs = HunyuanVideo(operations=comfy.ops.disable_weight_init, device="meta", **dit_config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("changes", [dict(in_channels=33, guidance_embed=False), dict(in_channels=33),
                                     dict(in_channels=65, out_channels=32, patch_size=[1, 1, 1], vec_in_dim=None,
                                          guidance_embed=False, byt5=True, depth_single_blocks=0,
                                          use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True)],
                         ids=["1.0-i2v", "1.0-i2v-guidance", "1.5"])
def test_comfyui_state_dict_loads_into_ours(rng, changes):
    """The other way round: ComfyUI's class with random weights; we read its config and load it strictly."""
    require_comfyui()
    import comfy.ops
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    base = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=32, hidden_size=256, mlp_ratio=4.0,
                num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
                vision_in_dim=None, meanflow_sum=False)
    theirs = _random_(HunyuanVideo(operations=comfy.ops.disable_weight_init, **{**base, **changes}), rng).eval()
    ours = HunyuanVideoDiT(config_from_state_dict(theirs.state_dict()))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    cfg = ours.config
    assert cfg.in_channels == changes["in_channels"] and cfg.guidance_embed == changes.get("guidance_embed", True)
    p = cfg.patch_size[1]
    x = torch.randn(1, cfg.in_channels, 2, 2 * p, 3 * p, generator=rng)
    ctx, _ = _text(rng, 1)
    extra = dict(txt_byt5=torch.randn(1, 3, 1472, generator=rng),
                 clip_fea=torch.randn(1, 4, 1152, generator=rng)) if cfg.byt5_in_dim else {}
    y, t, g = torch.randn(1, 768, generator=rng), torch.tensor([420.0]), torch.tensor([5.0])
    with torch.no_grad():
        a = ours(x, t, ctx, y, g, **extra)
        c = theirs(x, t, ctx, y=y, guidance=g, **extra)
    assert_equal_outputs(a, c, f"ComfyUI weights in ours ({changes['in_channels']} channels)")


def test_comfyui_stock_loader_reads_our_v15_file(rng, tmp_path):
    """A 1.5 file saved by us loads through comfy.sd.load_diffusion_model as HunyuanVideo15 and matches."""
    require_comfyui()
    import comfy.sd

    from quantsparse_core.models.weights import atomic_save_safetensors, load_dit
    ours = _random_(HunyuanVideoDiT(get_preset("test-1.5")), rng).eval()
    path = tmp_path / "dit15.safetensors"
    atomic_save_safetensors(ours.state_dict(), path)
    patcher = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    assert type(patcher.model).__name__ == "HunyuanVideo15"
    theirs = patcher.model.diffusion_model
    reloaded, _ = load_dit(path)
    assert reloaded.config == ours.config
    x, ctx, _, byt5, vision = v15_inputs(rng, 1, (2, 3, 4), 2, 3, False)
    t = torch.tensor([333.0])
    with torch.no_grad():
        a = reloaded(x, t, ctx, txt_byt5=byt5, clip_fea=vision)
        c = theirs(x, t, ctx, txt_byt5=byt5, clip_fea=vision)
    assert_equal_outputs(a, c.to(a.dtype), "1.5 through ComfyUI's stock loader")

"""Load Compressed DiT on HunyuanVideo 1.0 I2V and 1.5 checkpoints (issue 17), in a real ComfyUI.

Runs only with COMFYUI_PATH set. A random-weight `test-i2v` / `test-1.5` model is RTN-compressed and saved
by quantsparse_core (tests/test_variant_checkpoints.py tests that file format alone); the node loads it as
ComfyUI's own model class for the variant (ComfyUI's detection reads the file's keys), and one diffusion-model
call through ComfyUI, with the patcher's wrappers and options as a sampler passes them, equals our compressed
core model (load_compressed of the same file) on the same inputs. Variants the format does not hold are refused
at load, naming the model.
"""
import importlib

import pytest
import torch

from quantsparse_core.io import CheckpointError, load_compressed, save_compressed
from quantsparse_core.io import checkpoint as ckpt
from quantsparse_core.models import get_preset

from comfy_env import require_comfyui
from test_checkpoint import _rewrite
from test_comfy_nodes import load_pack
from test_variant_checkpoints import SUPPORTED_TEXT, UNSUPPORTED, random_model, rtn

PACK = "comfyui_quantsparse_under_test"
# variant file -> (ComfyUI model_base class, model_family.classify name, fused blocks installed)
EXPECTED = {"test-i2v": ("HunyuanVideoI2V", "HunyuanVideo 1.0 I2V", True),
            "test-1.5": ("HunyuanVideo15", "HunyuanVideo 1.5 T2V/I2V", True)}
# Weight-only: no activation rounding, the float tolerance (both sides compute in fp32 from the same bf16
# floats and int4 codes). W4A8: an activation that differs by ~1e-7 between the two graphs (RoPE and fused
# small-op arithmetic order) can round to the neighbouring int8 code, which moves the output by ~1e-4 per flip;
# a seed with several flips in one call reached 1e-3 once (2026-12-06), hence 5e-3 (the server test's bound).
TOL = {16: 1e-5, 8: 5e-3}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    require_comfyui()
    import folder_paths
    models = tmp_path_factory.mktemp("models") / "diffusion_models"
    (models / "quantsparse").mkdir(parents=True)
    folder_paths.add_model_folder_path("diffusion_models", str(models), is_default=True)
    nodes = load_pack()
    return nodes, models, importlib.import_module(f"{PACK}.nodes.model_family"), \
        importlib.import_module(f"{PACK}.nodes.fused_blocks")


def _write(models, name, config, rng, a_bits=8):
    q, policy = rtn(random_model(config, rng), 4, a_bits)
    save_compressed(q, models / "quantsparse" / f"{name}.safetensors", policy, calibration={"method": "rtn"})
    return models / "quantsparse" / f"{name}.safetensors", f"quantsparse/{name}.safetensors"


def _load(nodes, name):
    with torch.inference_mode():  # as ComfyUI runs every node
        return nodes["QuantSparseLoadCompressedDiT"].execute(name).result[0]


def _comfy_forward(patcher, x, t, ctx, **kw):
    """One diffusion-model call as ComfyUI's sampler makes it: the patcher's transformer_options and its
    wrappers (fused blocks, text-mask batching), merged the way sampler_helpers does."""
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers
    with torch.inference_mode():
        return patcher.model.diffusion_model(x, t, ctx, transformer_options=to, **kw)


def _cases(config, rng):
    """(label, x, timestep, context, keyword inputs) shared by both models: every input the variant takes."""
    p = config.patch_size[1]
    t = torch.rand(2, generator=rng) * 1000
    ctx = torch.randn(2, 7, config.context_in_dim, generator=rng)
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 5:] = 0  # padded like a real prompt; ComfyUI takes one [1, L] text mask per call
    if config.byt5_in_dim:  # 1.5: 32 noisy + 32 image latent + 1 mask channels
        x = torch.randn(2, 65, 2, 5, 3, generator=rng)
        return [("byT5 + image tokens, batch 2", x, t, ctx,
                 dict(txt_byt5=torch.randn(2, 3, 1472, generator=rng), clip_fea=torch.randn(2, 4, 1152, generator=rng))),
                ("text mask", x[:1], t[:1], ctx[:1], dict(attention_mask=mask))]
    x = torch.randn(1, 33, 2, 4 * p, 3 * p, generator=rng)  # 16 noisy + 16 image latent + 1 mask channels
    y = torch.randn(2, 768, generator=rng)
    ref = torch.randn(1, 33, 1, 4 * p, 3 * p, generator=rng)
    return [("reference latent + text mask", x, t[:1], ctx[:1], dict(y=y[:1], ref_latent=ref, attention_mask=mask)),
            ("batch 2", torch.cat([x, -x]), t, ctx, dict(y=y))]


@pytest.mark.parametrize("a_bits", [16, 8], ids=["W4A16", "W4A8"])
@pytest.mark.parametrize("preset", list(EXPECTED))
def test_compressed_variant_loads_as_comfyuis_model_and_equals_the_core(pack, rng, preset, a_bits):
    nodes, models, family, fused = pack
    comfy_class, variant, fused_on = EXPECTED[preset]
    path, name = _write(models, f"{preset}-w4a{a_bits}", get_preset(preset), rng, a_bits)
    patcher = _load(nodes, name)
    assert type(patcher.model).__name__ == comfy_class and family.classify(patcher) == variant
    assert fused.is_fused(patcher) == fused_on
    core, header = load_compressed(path)
    quant = [m for m in patcher.model.diffusion_model.modules() if getattr(m, "quant", None) is not None]
    assert len(quant) == len(header["policy"]) > 0
    for label, x, t, ctx, kw in _cases(core.config, rng):
        before = dict(fused.counts)
        got = _comfy_forward(patcher, x, t, ctx, **kw)
        with torch.no_grad():
            ref = core(x, t, ctx, **kw)
        assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
        rel = float((got - ref).norm() / ref.norm())
        print(f"{preset} W4A{a_bits} {label}: ComfyUI vs core, relative error {rel:.2e}")
        assert rel <= TOL[a_bits], f"{label}: {rel:.2e}"
        ran_fused = fused.counts["double"] > before.get("double", 0)
        assert ran_fused == fused_on, label  # I2V: the fused blocks ran (no fallback); 1.5: ComfyUI's blocks


def test_calibrate_writes_i2v_and_15_round_to_nearest_and_refuses_msad(pack, rng, tmp_path):
    """QuantSparse Calibrate on a full-precision I2V / 1.5 MODEL: method rtn writes the same file as
    quantsparse_core's compress_rtn of those weights (loading as the same variant); MSAD runs on 1.5 (byT5 tokens
    and image channels from ComfyUI's conds) and is refused for I2V without its start image, naming the fix."""
    import re

    import comfy.sd
    from safetensors.torch import load_file

    from quantsparse_core.io.rtn import compress_rtn
    nodes, models, family, _ = pack
    for preset, (comfy_class, variant, _) in EXPECTED.items():
        sd = {k: v.to(torch.bfloat16) for k, v in random_model(get_preset(preset), rng).state_dict().items()}
        full = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
        assert family.classify(full) == variant
        cond = [[torch.randn(1, 7, 32, generator=rng), {"pooled_output": torch.randn(1, 768, generator=rng)}]]

        channels = 32 if preset == "test-1.5" else 16  # EmptyHunyuanVideo15Latent / EmptyHunyuanLatentVideo

        def calibrate(method, name):
            with torch.inference_mode():
                return nodes["QuantSparseCalibrate"].execute(
                    model=full, positive=cond, latent={"samples": torch.zeros(1, channels, 2, 8, 8)}, weight_bits="4",
                    activation_bits="8", method=method, samples=1, steps=2, epochs=1, lambda_global=1.0,
                    lambda_local=1.0, pool_stride=16, salient_tokens=16, seed=0, output_name=name).result[0]
        if preset == "test-i2v":  # MSAD needs the start image (test_calibrate_runs_msad_on_i2v_with_its_start_image)
            with pytest.raises(ValueError, match="needs its start image: feed the prompt through HunyuanImageToVideo"):
                calibrate("msad", f"refused-{preset}")
            assert not (models / "quantsparse" / f"refused-{preset}.safetensors").exists()
        else:  # 1.5: MSAD on ComfyUI's own 1.5 conds (image channels zero for text-to-video, byT5 tokens given)
            cond[0][1]["conditioning_byt5small"] = torch.randn(1, 3, 1472, generator=rng)
            out = calibrate("msad", f"msad-{preset}")
            core, header = load_compressed(models / "quantsparse" / f"msad-{preset}.safetensors")
            assert core.config.variant == "HunyuanVideo 1.5" and header["calibration"]["settings"]["method"] == "msad"
        out = calibrate("rtn", f"rtn-{preset}")
        assert type(out.model).__name__ == comfy_class and family.classify(out) == variant
        written = load_file(str(models / "quantsparse" / f"rtn-{preset}.safetensors"))
        compress_rtn(sd, tmp_path / f"{preset}.safetensors", 4, 8)
        want = load_file(str(tmp_path / f"{preset}.safetensors"))
        assert set(written) == set(want)
        for k in want:
            assert torch.equal(written[k], want[k]), k


@pytest.mark.parametrize("variant", list(UNSUPPORTED))
def test_unsupported_variant_files_are_refused_at_load_naming_the_model(pack, rng, monkeypatch, variant):
    nodes, models, _, _ = pack
    with monkeypatch.context() as m:  # write a file complete in every other respect
        m.setattr(ckpt, "LOADABLE", ckpt.LOADABLE + (variant,))
        path, name = _write(models, f"unsupported-{variant}", UNSUPPORTED[variant], rng)
    with pytest.raises(CheckpointError) as err:
        _load(nodes, name)
    assert str(err.value) == f"{path}: the model is {variant}; {SUPPORTED_TEXT}"


def test_hunyuan_image_21_file_is_refused_at_load(pack, rng):
    nodes, models, _, _ = pack
    path, _ = _write(models, "v15-for-image21", get_preset("test-1.5"), rng)
    _rewrite(path, models / "quantsparse" / "image21.safetensors",
             edit_header=lambda h: h["config"].update(cond_type_embedding=False, vision_in_dim=None))
    with pytest.raises(CheckpointError, match=r"image21\.safetensors has an invalid model config in its header: .*"
                                              r"\(HunyuanImage 2\.1 orders those tokens differently\); unsupported"):
        _load(nodes, "quantsparse/image21.safetensors")


def test_comfyui_building_another_model_than_the_header_names_is_refused(pack, rng, monkeypatch):
    """If ComfyUI's detection ever read one of our files as another family member than its header says."""
    nodes, models, _, _ = pack
    _, name = _write(models, "mismatch", get_preset("test-i2v"), rng)
    model_nodes = importlib.import_module(f"{PACK}.nodes.model_nodes")
    monkeypatch.setitem(model_nodes.FROM_CONFIG, "HunyuanVideo 1.0 I2V", "HunyuanVideo 1.0 T2V")
    with pytest.raises(ValueError, match=r"^ComfyUI built quantsparse/mismatch\.safetensors as HunyuanVideo 1\.0 I2V, "
                                         r"but its QuantSparse header describes HunyuanVideo 1\.0 T2V"):
        _load(nodes, name)


def test_t2v_checkpoint_still_loads_fused(pack, rng):
    """The 1.0 T2V path is unchanged: ComfyUI's HunyuanVideo class, fused blocks on."""
    nodes, models, family, fused = pack
    _, name = _write(models, "t2v", get_preset("test"), rng)
    patcher = _load(nodes, name)
    assert type(patcher.model).__name__ == "HunyuanVideo" and family.classify(patcher) == "HunyuanVideo 1.0 T2V"
    assert fused.is_fused(patcher)


def test_calibrate_runs_msad_on_i2v_with_its_start_image(pack, rng):
    """HunyuanVideo 1.0 I2V with HunyuanImageToVideo's 'v1 (concat)' conditioning: the node takes the image
    latent + mask channels from ComfyUI's own concat_cond and calibrates streamed MSAD; 'v2 (replace)' is refused."""
    import comfy.sd
    nodes, models, family, _ = pack
    model_nodes = importlib.import_module(f"{PACK}.nodes.model_nodes")
    sd = {k: v.to(torch.bfloat16) for k, v in random_model(get_preset("test-i2v"), rng).state_dict().items()}
    full = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    image = torch.randn(1, 16, 1, 8, 8, generator=rng)  # a start image's latent (one latent frame)
    mask = torch.ones(1, 1, 2, 8, 8)
    mask[:, :, :1] = 0
    extras = {"pooled_output": torch.randn(1, 768, generator=rng), "concat_latent_image": image, "concat_mask": mask}
    cond = [[torch.randn(1, 7, 32, generator=rng), extras]]
    latent = torch.zeros(1, 16, 2, 8, 8)
    channels = model_nodes.hunyuan_image_channels(full, cond, latent)
    assert channels.shape == (1, 17, 2, 8, 8) and torch.isfinite(channels).all() and channels.abs().max() > 0

    def calibrate(c, name):
        with torch.inference_mode():
            return nodes["QuantSparseCalibrate"].execute(
                model=full, positive=c, latent={"samples": latent}, weight_bits="4", activation_bits="8",
                method="msad", samples=2, steps=2, epochs=1, lambda_global=1.0, lambda_local=1.0, pool_stride=16,
                salient_tokens=16, seed=0, output_name=name).result[0]
    out = calibrate(cond, "i2v-msad")
    assert family.classify(out) == "HunyuanVideo 1.0 I2V"
    core, header = load_compressed(models / "quantsparse" / "i2v-msad.safetensors")
    assert core.config.variant == "HunyuanVideo 1.0 I2V" and header["calibration"]["settings"]["method"] == "msad"
    assert len(header["calibration"]["final_losses"]) == 2
    replace = [[cond[0][0], {"pooled_output": extras["pooled_output"], "guiding_frame_index": 0}]]
    with pytest.raises(ValueError, match="'v2 \\(replace\\)' guidance"):
        calibrate(replace, "i2v-refused")
    assert not (models / "quantsparse" / "i2v-refused.safetensors").exists()

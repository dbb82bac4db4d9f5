"""Compressed Wan checkpoints in a real ComfyUI (issue 18): Load Compressed DiT builds ComfyUI's own WanModel
from the file and one diffusion-model call equals our compressed core WanDiT (load_compressed of the same file);
QuantSparse Calibrate writes a Wan checkpoint round-to-nearest from a full-precision Wan MODEL (LoRA / weight
patches baked in), equal to quantsparse_core's compress_rtn of the same weights, and refuses MSAD for Wan.

Runs only with COMFYUI_PATH set."""
import dataclasses
import importlib

import pytest
import torch
from safetensors.torch import load_file

from quantsparse_core.io import load_compressed
from quantsparse_core.io.rtn import compress_rtn
from quantsparse_core.models import WanDiT, get_wan_preset

from test_comfy_variant_checkpoints import TOL, _comfy_forward, _load, pack  # noqa: F401  (pack: the fixture)

PACK = "comfyui_quantsparse_under_test"
# preset -> (ComfyUI model_base class, model_family.classify name)
EXPECTED = {"wan-test": ("WAN21", "Wan 2.1/2.2 T2V"), "wan-test-i2v": ("WAN21", "Wan 2.1 I2V"),
            "wan-test-ti2v": ("WAN22", "Wan 2.2 TI2V 5B")}
CONFIGS = {"wan-test-ti2v": dataclasses.replace(get_wan_preset("wan-test"), in_dim=48, out_dim=48)}


def config_of(preset):
    return CONFIGS.get(preset) or get_wan_preset(preset)


def random_sd(preset, rng):
    """A bf16 ComfyUI-format Wan state dict of random weights."""
    m = WanDiT(config_of(preset), device="meta")
    return {k: (torch.randn(v.shape, generator=rng) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}


def inputs(config, rng):
    x = torch.randn(2, config.in_dim, 2, 6, 8, generator=rng)
    t = torch.rand(2, generator=rng) * 1000
    ctx = torch.randn(2, 7, config.text_dim, generator=rng)
    kw = {"clip_fea": torch.randn(2, 257, 1280, generator=rng)} if config.model_type == "i2v" else {}
    return x, t, ctx, kw


@pytest.mark.parametrize("a_bits", [16, 8], ids=["W4A16", "W4A8"])
@pytest.mark.parametrize("preset", list(EXPECTED))
def test_compressed_wan_loads_as_comfyuis_wanmodel_and_equals_the_core(pack, rng, preset, a_bits):
    nodes, models, family, fused = pack
    comfy_class, variant = EXPECTED[preset]
    path = models / "quantsparse" / f"{preset}-w4a{a_bits}.safetensors"
    compress_rtn(random_sd(preset, rng), path, 4, a_bits)
    patcher = _load(nodes, f"quantsparse/{path.name}")
    assert type(patcher.model).__name__ == comfy_class and family.classify(patcher) == variant
    assert type(patcher.model.diffusion_model).__name__ == "WanModel" and fused.is_fused(patcher)
    core, header = load_compressed(path)
    quant = [m for m in patcher.model.diffusion_model.modules() if getattr(m, "quant", None) is not None]
    assert len(quant) == len(header["policy"]) > 0
    x, t, ctx, kw = inputs(core.config, rng)
    got = _comfy_forward(patcher, x, t, ctx, **kw)
    with torch.no_grad():
        ref = core(x, t, ctx, **kw)
    assert got.shape == ref.shape and torch.isfinite(ref).all()
    rel = float((got.float() - ref).norm() / ref.norm())
    print(f"{preset} W4A{a_bits}: ComfyUI vs core, relative error {rel:.2e}")
    assert rel <= TOL[a_bits]


def _calibrate(nodes, model, method, name, rng, samples=1, steps=2, **experts):
    cond = [[torch.randn(1, 7, 4096, generator=rng), {}]]
    with torch.inference_mode():
        return nodes["QuantSparseCalibrate"].execute(**experts,
            model=model, positive=cond, latent={"samples": torch.randn(1, 16, 2, 8, 8, generator=rng)},
            weight_bits="4", activation_bits="8", method=method, samples=samples, steps=steps, epochs=1, lambda_global=1.0,
            lambda_local=1.0, pool_stride=16, salient_tokens=16, seed=0, output_name=name).result[0]


def test_calibrate_writes_a_round_to_nearest_wan_checkpoint(pack, rng, tmp_path):
    import comfy.sd
    nodes, models, family, _ = pack
    sd = random_sd("wan-test", rng)
    full = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.float32})
    assert family.classify(full) == "Wan 2.1/2.2 T2V"
    # a weight patch (as a LoRA loader adds one) is baked into the compressed weights
    key = "diffusion_model.blocks.0.ffn.0.weight"
    diff = torch.randn(sd["blocks.0.ffn.0.weight"].shape, generator=rng) * 0.05
    patched = full.clone()
    assert patched.add_patches({key: (diff,)}, 1.0) == [key]


    out = _calibrate(nodes, patched, "rtn", "wan-rtn", rng)
    assert family.classify(out) == "Wan 2.1/2.2 T2V"
    written = load_file(str(models / "quantsparse" / "wan-rtn.safetensors"))
    want_sd = {k: v.float() for k, v in sd.items()}
    want_sd["blocks.0.ffn.0.weight"] = want_sd["blocks.0.ffn.0.weight"] + diff
    compress_rtn(want_sd, tmp_path / "ref.safetensors", 4, 8)
    want = load_file(str(tmp_path / "ref.safetensors"))
    assert set(written) == set(want)
    for k in want:
        assert torch.equal(written[k], want[k]), k
    unpatched = tmp_path / "unpatched.safetensors"
    compress_rtn(sd, unpatched, 4, 8)
    assert not torch.equal(load_file(str(unpatched))["blocks.0.ffn.0.weight_packed"],
                           written["blocks.0.ffn.0.weight_packed"])


def test_calibrate_runs_msad_on_wan_t2v_and_i2v(pack, rng):
    """Wan T2V and 2.1 I2V: the node's streamed MSAD calibration (the HunyuanVideo path, block by block) writes
    a file that loads as ComfyUI's WanModel and as our core WanDiT. I2V's CLIP tokens and mask + image-latent
    channels come from ComfyUI's own WAN21.extra_conds on the conditioning WanImageToVideo makes."""
    import types

    import comfy.sd
    nodes, models, family, _ = pack
    model_nodes = importlib.import_module(f"{PACK}.nodes.model_nodes")
    full = comfy.sd.load_diffusion_model_state_dict(random_sd("wan-test", rng), model_options={"dtype": torch.float32})
    out = _calibrate(nodes, full, "msad", "wan-msad", rng, samples=2)
    assert family.classify(out) == "Wan 2.1/2.2 T2V"
    path = models / "quantsparse" / "wan-msad.safetensors"
    core, header = load_compressed(path)
    assert header["model_family"] == "wan" and header["calibration"]["settings"]["method"] == "msad"
    assert len(header["calibration"]["final_losses"]) == 2  # both blocks calibrated
    x, t, ctx, kw = inputs(core.config, rng)
    got = _comfy_forward(out, x, t, ctx, **kw)
    with torch.no_grad():
        ref = core(x, t, ctx, **kw)
    assert float((got.float() - ref).norm() / ref.norm()) <= TOL[8]

    i2v = comfy.sd.load_diffusion_model_state_dict(random_sd("wan-test-i2v", rng), model_options={"dtype": torch.float32})
    mask = torch.ones(1, 1, 2, 8, 8)  # at the latent's size, as WanImageToVideo makes it
    mask[:, :, :1] = 0  # the first frame is the given image (WanImageToVideo's concat_mask)
    extras = {"concat_latent_image": torch.randn(1, 16, 2, 8, 8, generator=rng), "concat_mask": mask,
              "clip_vision_output": types.SimpleNamespace(penultimate_hidden_states=torch.randn(1, 257, 1280, generator=rng))}
    cond = [[torch.randn(1, 7, 4096, generator=rng), extras]]
    latent = torch.zeros(1, 16, 2, 8, 8)
    wc = model_nodes.wan_conditioning(i2v, cond, latent)
    assert wc.clip_fea.shape == (1, 257, 1280) and wc.concat.shape == (1, 20, 2, 8, 8)
    assert torch.equal(wc.concat[:, :4, 0], torch.ones(1, 4, 8, 8))  # ComfyUI inverts the mask: 1 = given frame
    with torch.inference_mode():
        nodes["QuantSparseCalibrate"].execute(
            model=i2v, positive=cond, latent={"samples": latent}, weight_bits="4", activation_bits="8", method="msad",
            samples=2, steps=2, epochs=1, lambda_global=1.0, lambda_local=1.0, pool_stride=16, salient_tokens=16,
            seed=0, output_name="wan-i2v-msad")
    core, header = load_compressed(models / "quantsparse" / "wan-i2v-msad.safetensors")
    assert core.config.variant == "Wan 2.1 I2V" and len(header["calibration"]["final_losses"]) == 2
    no_clip = [[cond[0][0], {k: v for k, v in extras.items() if k != "clip_vision_output"}]]
    with pytest.raises(ValueError, match="needs CLIP image tokens"):
        model_nodes.wan_conditioning(i2v, no_clip, latent)


def test_calibrate_a_wan22_expert_on_its_own_steps(pack, rng):
    """Wan 2.2 A14B: the low-noise expert is calibrated on the steps below the boundary, on trajectories whose
    earlier steps the high-noise expert (other_expert) runs; the header records the segment and that expert.
    Without other_expert the low-noise expert is refused; single models refuse the expert inputs."""
    import comfy.sd
    nodes, models, family, _ = pack
    load = lambda sd: comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})  # noqa: E731
    high, low = load(random_sd("wan-test", rng)), load(random_sd("wan-test", rng))
    _calibrate(nodes, low, "msad", "wan22-low", rng, samples=2, steps=6, expert_role="low noise",
               other_expert=high, expert_boundary=0.875)
    _, header = load_compressed(models / "quantsparse" / "wan22-low.safetensors")
    data = header["calibration"]["data"]
    assert data["sigma_range"] == [0.0, 0.875] and len(data["experts"]) == 1
    _calibrate(nodes, high, "msad", "wan22-high", rng, samples=2, steps=6, expert_role="high noise")
    _, header = load_compressed(models / "quantsparse" / "wan22-high.safetensors")
    assert header["calibration"]["data"]["sigma_range"] == [0.875, 2.0]
    with pytest.raises(ValueError, match="connect the high-noise expert's MODEL to other_expert"):
        _calibrate(nodes, low, "msad", "wan22-refused", rng, expert_role="low noise")
    with pytest.raises(ValueError, match="set expert_role to the role of this MODEL"):
        _calibrate(nodes, low, "msad", "wan22-refused", rng, other_expert=high)
    assert not (models / "quantsparse" / "wan22-refused.safetensors").exists()


def test_calibrate_reads_an_fp8_model_as_bf16(pack, rng):
    """UNETLoader's weight_dtype fp8 (a common way to load Wan 14B): calibration computes in float, so the node
    reads fp8 weights as bf16 (GPU) / float32 (CPU) block by block instead of failing inside a float8 matmul."""
    import comfy.sd
    nodes, models, family, _ = pack
    model_nodes = importlib.import_module(f"{PACK}.nodes.model_nodes")
    fp8 = comfy.sd.load_diffusion_model_state_dict(random_sd("wan-test", rng),
                                                   model_options={"dtype": torch.float8_e4m3fn})
    src = model_nodes.ComfyBlockSource(fp8)  # bf16 where the node runs on a GPU (float32 on a CPU, as here)
    assert src.dtype == torch.bfloat16 and all(v.dtype != torch.float8_e4m3fn for v in src.tensors("wan", 0).values())
    _calibrate(nodes, fp8, "msad", "wan-fp8", rng, samples=2)
    core, header = load_compressed(models / "quantsparse" / "wan-fp8.safetensors")
    assert header["calibration"]["settings"]["method"] == "msad" and core.config.variant == "Wan 2.1/2.2 T2V"


def test_lora_on_a_compressed_wan_model(pack, rng, tmp_path, caplog):
    """A LoRA on every block linear of a compressed Wan (ComfyUI's own loader, diffusers key naming): every key
    maps, every quantized layer takes its side path, and the output equals ComfyUI's bypass LoRA (the same
    low-rank math in ComfyUI's code) on the same compressed model; weight-only, so the equality is tight."""
    import logging

    import comfy.model_management
    import comfy.sd
    ops = importlib.import_module(f"{PACK}.nodes.comfy_ops")
    path = tmp_path / "wan-w4a16.safetensors"
    compress_rtn(random_sd("wan-test", rng), path, 4, 16)
    base = ops.load_compressed_patcher(path)
    layers = {n: m for n, m in base.model.diffusion_model.named_modules() if getattr(m, "quant", None) is not None}
    lora = {}
    for name, m in layers.items():
        k = f"diffusion_model.{name}"
        lora[f"{k}.lora_A.weight"] = torch.randn(4, m.in_features, generator=rng) / m.in_features ** 0.5
        lora[f"{k}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=rng) * 0.3
        lora[f"{k}.alpha"] = torch.tensor(2.0)
    with caplog.at_level(logging.WARNING):
        patched = comfy.sd.load_lora_for_models(base, None, lora, 0.7, 0.0)[0]
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    bypass = comfy.sd.load_bypass_lora_for_models(base, None, lora, 0.7, 0.0)[0]
    x, t, ctx, kw = inputs(get_wan_preset("wan-test"), rng)

    def run(p):
        comfy.model_management.load_models_gpu([p])
        with torch.inference_mode():
            return p.model.diffusion_model(x, t, ctx, transformer_options={}, **kw).clone()
    ours = run(patched)
    assert all(m.lora is not None for m in layers.values())
    theirs, plain = run(bypass), run(base)
    rel = float((ours - theirs).norm() / theirs.norm())
    print(f"Wan LoRA side path vs ComfyUI's bypass LoRA: {rel:.2e}; LoRA effect {float((ours - plain).norm() / plain.norm()):.2e}")
    assert rel <= 1e-5 and float((ours - plain).norm() / plain.norm()) > 1e-2

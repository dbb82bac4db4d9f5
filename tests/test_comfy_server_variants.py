"""Every supported variant through a real ComfyUI server (issue 17, 18): a random-weights full-precision model
file -> UNETLoader -> QuantSparse Calibrate (round-to-nearest) -> Sparse Sampler -> SaveLatent, as a queued API
prompt; the written checkpoint is the variant it came from and the sampled latent is finite. Unsupported
variants are refused on the node, naming the model. Conditioning comes from the test-only node pack
tests/comfy_test_nodes (no text encoder for random-weight models).

Needs COMFYUI_PATH; skipped otherwise (the server fixture is tests/test_comfy_server.py's)."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantsparse_core.io import load_compressed
from quantsparse_core.models import HunyuanVideoDiT, WanDiT, get_preset, get_wan_preset

from test_comfy_server import server  # noqa: F401  (the server fixture)

# name -> (core model, conditioning width, pooled, latent node, its inputs, the variant the checkpoint holds)
SMALL = dict(width=64, height=64, length=5, batch_size=1)
SUPPORTED = {
    "hv-i2v": (lambda: HunyuanVideoDiT(get_preset("test-i2v")), 32, True, "EmptyHunyuanLatentVideo", SMALL,
               "HunyuanVideo 1.0 I2V"),
    # ComfyUI's HunyuanVideo15 reads a pooled_output (HunyuanVideo.encode_adm) though 1.5 has no vector input
    "hv-1.5": (lambda: HunyuanVideoDiT(get_preset("test-1.5")), get_preset("test-1.5").context_in_dim, True,
               "EmptyHunyuanVideo15Latent",
               dict(SMALL, width=128, height=128), "HunyuanVideo 1.5"),
    "wan-t2v": (lambda: WanDiT(get_wan_preset("wan-test")), 4096, False, "EmptyHunyuanLatentVideo", SMALL,
                "Wan 2.1/2.2 T2V"),
    "wan-ti2v": (lambda: WanDiT(dataclasses.replace(get_wan_preset("wan-test"), in_dim=48, out_dim=48)), 4096,
                 False, "EmptyHunyuanLatentVideo", SMALL, "Wan 2.2 TI2V 5B"),
}
UNSUPPORTED = {
    "skyreels": (lambda: HunyuanVideoDiT(dataclasses.replace(get_preset("test"), in_channels=32)), "SkyReels I2V"),
    "hv-1.5-sr": (lambda: HunyuanVideoDiT(dataclasses.replace(get_preset("test-1.5"), in_channels=98)),
                  "HunyuanVideo 1.5 super-resolution"),
}
SPARSE = dict(density=0.3, refresh_interval=2, svd_rank=4, warmup_steps=1, warmup_blocks=0, cache_placement="auto")


def _model_file(server, name, build, seed=0):
    """A bf16 random-weights diffusion-model file in the server's models/diffusion_models/."""
    m = build()
    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}
    path = server.base / "models" / "diffusion_models" / f"qs_variant_{name}.safetensors"
    save_file(sd, str(path))
    return path.name


def _prompt(unet, width, pooled, latent_type, latent_inputs, out, sparse_from="2"):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "QuantSparseTestConditioning", "inputs": {"seed": 1, "tokens": 7, "width": width,
                                                                     "pooled": pooled}},
        "4": {"class_type": latent_type, "inputs": latent_inputs},
        "2": {"class_type": "QuantSparseCalibrate", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "latent": ["4", 0], "weight_bits": "4", "activation_bits": "8",
            "method": "rtn", "samples": 1, "steps": 2, "epochs": 1, "lambda_global": 0.1, "lambda_local": 0.1,
            "pool_stride": 16, "salient_tokens": 16, "seed": 0, "output_name": out}},
        "5": {"class_type": "QuantSparseSparseSampler", "inputs": {
            "model": [sparse_from, 0], "seed": 3, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0, **SPARSE}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"qs/{out}"}},
    }


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_compress_load_and_sparse_sample_each_variant(server, name):  # noqa: F811
    build, width, pooled, latent_type, latent_inputs, variant = SUPPORTED[name]
    unet = _model_file(server, name, build)
    out = f"variant {name}"
    entry = server.run(_prompt(unet, width, pooled, latent_type, latent_inputs, out))
    core, header = load_compressed(server.base / "models" / "diffusion_models" / "quantsparse" / f"{out}.safetensors")
    assert core.config.variant == variant and header["calibration"]["settings"]["method"] == "rtn"
    saved = entry["outputs"]["6"]["latents"][0]
    latent = load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert torch.isfinite(latent).all() and latent.abs().max() > 0
    # the compressed file also loads through Load Compressed DiT and samples sparsely there
    again = _prompt(unet, width, pooled, latent_type, latent_inputs, out, sparse_from="7")
    again["7"] = {"class_type": "QuantSparseLoadCompressedDiT", "inputs": {"checkpoint": f"quantsparse/{out}.safetensors"}}
    del again["2"]
    again["6"]["inputs"]["filename_prefix"] = f"qs/{out} reloaded"
    entry = server.run(again)
    saved = entry["outputs"]["6"]["latents"][0]
    reloaded = load_file(str(server.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert torch.equal(reloaded, latent)  # the MODEL Calibrate returned is the file Load Compressed DiT loads


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_variants_are_refused_on_the_node(server, name):  # noqa: F811
    build, variant = UNSUPPORTED[name]
    unet = _model_file(server, name, build)
    prompt = _prompt(unet, 32, True, "EmptyHunyuanLatentVideo", SMALL,
                     f"refused {name}", sparse_from="1")
    del prompt["2"]
    with pytest.raises(AssertionError, match=f"Sparse Sampler does not support this MODEL: it is {variant}"):
        server.run(prompt)

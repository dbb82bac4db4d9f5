"""The tiny-model helper nodes with family Wan, in a real ComfyUI: Load Embedded Tiny DiT builds ComfyUI's
WanModel from the tiny Wan file, Tiny Prompt Encode gives Wan's 4096-wide tokens, and KSampler -> Tiny Decode
equals our core generate_wan on the same weights, prompt and seed. Random weights stand in for the trained
tiny Wan (a GPU run); without the file the loader names the training command. Needs COMFYUI_PATH."""
import importlib

import pytest
import torch

from quantsparse_core.models.tiny.embedded import generate_wan, load_wan
from quantsparse_core.models.wan import WanDiT, get_wan_preset
from quantsparse_core.models.weights import atomic_save_safetensors

from comfy_env import require_comfyui
from test_comfy_nodes import load_pack

PACK = "comfyui_quantsparse_under_test"
PROMPT = "a blue square moving left slowly on a white background"


def test_tiny_wan_nodes_equal_the_core(rng, tmp_path, monkeypatch):
    require_comfyui()
    nodes = load_pack()
    tiny = importlib.import_module(f"{PACK}.nodes.tiny")
    path = tmp_path / "tiny_wan.safetensors"
    monkeypatch.setattr(tiny, "WAN_WEIGHTS", path)
    with pytest.raises(ValueError, match="--family wan"):
        nodes["QuantSparseLoadEmbeddedTinyDiT"].execute(family="Wan")
    m = WanDiT(get_wan_preset("tiny-wan"))
    sd = {k: (torch.randn(v.shape, generator=rng) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}
    atomic_save_safetensors(sd, path, {"format": "quantsparse-tiny-wan"})

    import nodes as comfy_nodes
    with torch.inference_mode():
        (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute(family="Wan").result
        assert type(model.model.diffusion_model).__name__ == "WanModel"
        (cond,) = nodes["QuantSparseTinyPromptEncode"].execute(text=PROMPT, family="Wan").result
        assert cond[0][0].shape == (1, 24, 4096)
        latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
        (out,) = comfy_nodes.common_ksampler(model, 3, 4, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0)
        (frames,) = nodes["QuantSparseTinyDecode"].execute(samples=out, family="Wan").result
    core, _ = load_wan(path)
    ref = generate_wan(core, [PROMPT], [3], steps=4, latent_shape=(16, 2, 8, 8))
    got = frames.reshape(1, 2, *frames.shape[1:]).permute(0, 4, 1, 2, 3)  # [B, 3, F, H, W] as generate_wan
    assert got.shape == ref.videos.shape
    rel = float((got - ref.videos).norm() / ref.videos.norm())
    print(f"tiny Wan through ComfyUI vs core: relative error {rel:.2e}")
    assert rel < 1e-4

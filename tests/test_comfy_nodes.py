"""The node pack loads the way ComfyUI loads custom nodes; the helper nodes equal the core."""
import asyncio
import importlib.util
import sys
from pathlib import Path

import torch

from comfy_env import require_comfyui

ROOT = Path(__file__).resolve().parents[1]


def load_pack():
    require_comfyui()
    name = "comfyui_quantsparse_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    ext = asyncio.run(sys.modules[name].comfy_entrypoint())
    return {cls.define_schema().node_id: cls for cls in asyncio.run(ext.get_node_list())}


def test_nodes_register_with_category_and_tooltips():
    nodes = load_pack()
    assert set(nodes) == {"QuantSparseCalibrate", "QuantSparseLoadCompressedDiT", "QuantSparseSparseSampler",
                          "QuantSparseSparseAttention", "QuantSparseLoadEmbeddedTinyDiT", "QuantSparseTinyPromptEncode",
                          "QuantSparseTinyDecode"}
    for cls in nodes.values():
        schema = cls.define_schema()
        assert schema.category == "QuantSparse"
        assert all(inp.tooltip for inp in schema.inputs), schema.node_id


def test_prompt_encode_and_decode_equal_the_core(rng):
    from quantsparse_core.models.tiny.codec import LatentCodec
    from quantsparse_core.models.tiny.prompts import PromptEncoder

    nodes = load_pack()
    text = "a blue square moving up quickly on a white background"
    (cond,) = nodes["QuantSparseTinyPromptEncode"].execute(text).result
    ctx, mask, pooled = PromptEncoder().encode([text])
    (tensor, extra), = cond
    assert torch.equal(tensor, ctx) and torch.equal(extra["attention_mask"], mask)
    assert torch.equal(extra["pooled_output"], pooled)

    import comfy.latent_formats
    lat = torch.randn(2, 16, 3, 8, 12, generator=rng)
    (img,) = nodes["QuantSparseTinyDecode"].execute({"samples": lat}).result
    ref = LatentCodec().decode(lat * comfy.latent_formats.HunyuanVideo().scale_factor)
    assert img.shape == (6, 32, 48, 3)
    torch.testing.assert_close(img[4], ref[1, :, 1].permute(1, 2, 0), atol=1e-6, rtol=0)


def test_embedded_model_loads_through_comfyui():
    nodes = load_pack()
    (patcher,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    assert type(patcher.model).__name__ == "HunyuanVideo"
    assert patcher.model.diffusion_model.num_heads == 2

"""QuantSparse nodes for ComfyUI, registered through the V3 node API."""
from comfy_api.latest import ComfyExtension, io

from .model_nodes import Calibrate, LoadCompressedDiT
from .sparse_nodes import SparseAttentionPatch, SparseSampler
from .tiny import LoadEmbeddedTinyDiT, TinyDecode, TinyPromptEncode

NODES = [Calibrate, LoadCompressedDiT, SparseSampler, SparseAttentionPatch,
         LoadEmbeddedTinyDiT, TinyPromptEncode, TinyDecode]


class QuantSparseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> QuantSparseExtension:
    return QuantSparseExtension()

"""QuantSparse nodes for ComfyUI, registered through the V3 node API."""
from comfy_api.latest import ComfyExtension, io

from .tiny import LoadEmbeddedTinyDiT, TinyDecode, TinyPromptEncode


class QuantSparseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadEmbeddedTinyDiT, TinyPromptEncode, TinyDecode]


async def comfy_entrypoint() -> QuantSparseExtension:
    return QuantSparseExtension()

"""A test-only ComfyUI node pack (linked into the test server's custom_nodes by tests/test_comfy_server.py, never
shipped): random conditioning of any width, so the server tests can run random-weight models of every supported
variant through the pack's nodes without a text encoder."""
import torch


class QuantSparseTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31}),
                             "tokens": ("INT", {"default": 7, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 32, "min": 1, "max": 8192}),
                             "pooled": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "QuantSparse/testing"

    def make(self, seed, tokens, width, pooled):
        g = torch.Generator().manual_seed(seed)
        extras = {"guidance": 6.0}
        if pooled:
            extras["pooled_output"] = torch.randn(1, 768, generator=g)
        return ([[torch.randn(1, tokens, width, generator=g), extras]],)


NODE_CLASS_MAPPINGS = {"QuantSparseTestConditioning": QuantSparseTestConditioning}

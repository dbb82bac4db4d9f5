"""Size of a compressed Wan checkpoint against bf16, on a meta-device model (no memory needed for 14B).

The byte rules are the checkpoint format's (quant.policy.storage_bytes: packed int4 or int8 weights, one
fp32 scale per output channel, every other tensor bf16); only which linears are quantized is Wan's own.
"""
from __future__ import annotations

from torch import nn

from ..quant.policy import LayerRule, storage_bytes
from .wan import WanConfig, WanDiT

BLOCK_PREFIX = "blocks."
# Cross-attention projections that read text / CLIP image tokens (at most a few hundred rows per call):
# weight-only, since activation quantization buys no speed there and the tokens come from another model.
CONTEXT_SUFFIXES = ("cross_attn.k", "cross_attn.v", "cross_attn.k_img", "cross_attn.v_img")


def wan_policy(model: nn.Module, w_bits: int = 4, a_bits: int = 8) -> dict:
    """{linear name: LayerRule} for every linear of the transformer blocks; the rest stays bf16.

    The block linears are 99% of the 14B model's weights. The modulation tables are parameters, not
    linears (6 x dim per block), so there is no adaLN linear to store weight-only as in HunyuanVideo."""
    policy = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(BLOCK_PREFIX):
            policy[name] = LayerRule(w_bits, 16 if name.endswith(CONTEXT_SUFFIXES) else a_bits)
    return policy


def wan_storage(config: WanConfig, w_bits: int = 4, a_bits: int = 8) -> dict:
    """storage_bytes of `config` under wan_policy, plus 'fraction' = compressed / bf16 bytes."""
    model = WanDiT(config, device="meta")
    out = storage_bytes(model, wan_policy(model, w_bits, a_bits))
    out["fraction"] = out["total"] / out["bf16_total"]
    return out

"""ComfyUI's WanAttentionBlock in QuantSparse's fused form (quantsparse_core/models/fusion_wan.py), through the
same block replacement as the HunyuanVideo blocks (fused_blocks.py installs it for each ("double_block", i) of a
WanModel). ComfyUI's own modules and weights are used as they are: the linears, norm3 and the cross-attention are
called as ComfyUI modules (casting, offloading, LoRA weight functions as in its forward), the q/k RMSNorm weights
go through `comfy.ops.cast_bias_weight`, the modulation table through `comfy.model_management.cast_to`, and the
self-attention through `comfy.ldm.wan.model.optimized_attention` with this call's transformer_options, so the
sparse patch (and any optimized_attention_override) sees the call exactly as ComfyUI's block makes it.
Falls back to ComfyUI's block for anything else: attn1/attn2 patches,
subclasses (VACE, ...), a forward another node replaced on an instance (object patches) of a module the fused form
does not call, other norms or activations, a RoPE table that does not match the tokens."""
from __future__ import annotations

import sys
from typing import Optional

import torch

from quantsparse_core.models import fusion_wan

from .fused_blocks import (WAN_IMAGE_TOKENS, _FLOAT, _Fallback, _NS, _check_ln, _mlp, block_for, check_unpatched,
                           counts, ops_for, rms_weight)


def _wan():
    return sys.modules["comfy.ldm.wan.model"]


def _qk_weight(norm, like):
    if not isinstance(norm, torch.nn.RMSNorm) or norm.weight is None or not isinstance(norm.eps, float):
        raise _Fallback("Wan q/k norm is not RMSNorm with a weight and an eps")
    return rms_weight(norm, like)


def wan_block_view(block, ops, like):
    """ComfyUI's WanAttentionBlock as fusion_wan.wan_block_fused takes it."""
    wan = _wan()
    if type(block) is not wan.WanAttentionBlock:
        raise _Fallback(f"Wan block class {type(block).__name__}")
    if type(block.cross_attn) not in (wan.WanT2VCrossAttention, wan.WanI2VCrossAttention):
        raise _Fallback(f"Wan cross-attention class {type(block.cross_attn).__name__}")
    _check_ln(block.norm1)
    _check_ln(block.norm2)
    sa = block.self_attn
    if type(sa) is not wan.WanSelfAttention:
        raise _Fallback(f"Wan self-attention class {type(sa).__name__}")
    check_unpatched(block, sa, block.norm1, block.norm2, sa.norm_q, sa.norm_k)  # the linears, norm3, the FFN's
    # linears and the cross-attention are called as modules: their patches apply (the FFN itself: _mlp)
    wq, wk = _qk_weight(sa.norm_q, like), _qk_weight(sa.norm_k, like)
    if sa.norm_q.eps != sa.norm_k.eps:
        raise _Fallback("q and k norms with different eps")
    fc1, act, fc2 = _mlp(block.ffn)
    return _NS(ops=ops, quantize_inputs=True, heads=sa.num_heads, eps=sa.norm_q.eps, q=sa.q, k=sa.k, v=sa.v,
               o=sa.o, wq=wq, wk=wk, norm3=block.norm3, fc1=fc1, act=act, fc2=fc2)


def _rope_table(freqs, x) -> torch.Tensor:
    """WanModel's freqs [1|B, L, 1, D/2, 2, 2] as the [1|B, 1, L, D/2, 2, 2] table the fused group takes."""
    if not torch.is_tensor(freqs) or freqs.ndim != 6 or freqs.dtype != torch.float32 or freqs.shape[2] != 1 \
            or freqs.shape[1] != x.shape[1] or freqs.shape[0] not in (1, x.shape[0]) or freqs.shape[-2:] != (2, 2):
        raise _Fallback("freqs is not an fp32 [B, L, 1, D/2, 2, 2] RoPE table over the block's tokens")
    return freqs.movedim(1, 2)


def _modulation(block, e0, x):
    """The six [B, R, C] modulation vectors as ComfyUI's block makes them (its table cast to x, plus e0): R = 1, or
    one row per latent frame (Wan 2.2 TI2V's per-frame timesteps), which ComfyUI repeats over each frame's tokens
    (repeat_e); a token count that is not a whole number of rows (repeat_e's other branch) falls back."""
    import comfy.model_management
    if not torch.is_tensor(e0) or e0.ndim != 4 or e0.shape[0] != x.shape[0] or e0.shape[2] != 6:
        raise _Fallback("vec is not the [B, R, 6, C] time projection")
    if x.shape[1] % e0.shape[1]:
        raise _Fallback("per-frame timesteps that do not split the tokens evenly")
    table = comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device)
    return (table.unsqueeze(0) + e0).unbind(2)


def run_wan(index: int, args: dict, compile: Optional[bool] = None) -> dict:
    """ComfyUI's Wan block `index` in fused form; raises _Fallback when it does not apply."""
    block, to = block_for("wan", index, args, attr="blocks")
    if (to.get("patches") or {}).get("attn2_patch"):
        raise _Fallback("attn2 patches are set")
    x, context = args["img"], args["txt"]
    if not torch.is_tensor(x) or x.ndim != 3 or x.dtype not in _FLOAT:
        raise _Fallback("activations are not [B, L, C] float tensors")
    mods = _modulation(block, args["vec"], x)
    table = _rope_table(args["pe"], x)
    view = wan_block_view(block, ops_for(x, compile), x)
    image_tokens = None
    if type(block.cross_attn) is _wan().WanI2VCrossAttention:
        image_tokens = to.get(WAN_IMAGE_TOKENS)
        if image_tokens is None:
            raise _Fallback("image-to-video cross-attention without a known CLIP token count")
    heads = view.heads

    def cross(h):
        return block.cross_attn(h, context, context_img_len=image_tokens, transformer_options=to)

    def attention(q, k, v):
        return _wan().optimized_attention(q, k, v, heads=heads, transformer_options=to)

    x = fusion_wan.wan_block_fused(view, x, mods, table, cross, attention)
    counts["wan"] += 1
    return {"img": x}

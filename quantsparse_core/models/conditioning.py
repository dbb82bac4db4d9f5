"""HunyuanVideo 1.5's extra conditioning inputs, with ComfyUI's key names and math.

1.5 puts three kinds of token in the text part of the joint sequence: the refined LLM text tokens,
glyph tokens from a ByT5 encoder (`byt5_in`) and SigLIP image tokens (`vision_in`). Each kind gets a
learned type vector added (`cond_type_embedding`, rows 0 / 1 / 2), and the sequence order is
[vision, byT5, text] (what ComfyUI's forward_orig builds). All of them sit at RoPE position 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEXT, BYT5, VISION = 0, 1, 2  # rows of cond_type_embedding


class ByT5Mapper(nn.Module):
    """ByT5 glyph features -> model width: LayerNorm, then three linears with exact GELU between them."""

    def __init__(self, in_dim, inner, out_dim, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.layernorm = nn.LayerNorm(in_dim, eps=1e-5, **kw)
        self.fc1 = nn.Linear(in_dim, inner, **kw)
        self.fc2 = nn.Linear(inner, inner, **kw)
        self.fc3 = nn.Linear(inner, out_dim, **kw)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.layernorm(x))))))


class VisionIn(nn.Module):
    """Image-encoder tokens -> model width (keys proj.0..4): LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, in_dim, out_dim, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.proj = nn.Sequential(nn.LayerNorm(in_dim, eps=1e-5, **kw), nn.Linear(in_dim, in_dim, **kw), nn.GELU(),
                                  nn.Linear(in_dim, out_dim, **kw), nn.LayerNorm(out_dim, eps=1e-5, **kw))

    def forward(self, x):
        return self.proj(x)


def check_tokens(name: str, x: torch.Tensor, batch: int, width: int) -> None:
    """Raise a ValueError naming `name` unless x is [batch, tokens, width]."""
    if x.ndim != 3 or x.shape[0] != batch or x.shape[-1] != width:
        raise ValueError(f"{name} must be [batch {batch}, tokens, {width}], got {tuple(x.shape)}")


def text_part(txt, cond_type_embedding: nn.Embedding, byt5_in: ByT5Mapper | None = None, txt_byt5=None,
              vision_in: VisionIn | None = None, clip_fea=None):
    """Refined text tokens [B, Lt, C] + optional byT5 / image tokens -> ([B, Lv + Lb + Lt, C], Lv + Lb).

    Each kind gets its cond_type_embedding row added; the result is ordered [vision, byT5, text]."""
    b, w = txt.shape[0], cond_type_embedding.weight
    parts = [txt + w[TEXT].to(txt.dtype)]
    if txt_byt5 is not None:
        if byt5_in is None:
            raise ValueError("txt_byt5 was given but this model has no byT5 input (no byt5_in weights)")
        check_tokens("txt_byt5", txt_byt5, b, byt5_in.layernorm.normalized_shape[0])
        glyph = byt5_in(txt_byt5)
        parts.insert(0, glyph + w[BYT5].to(glyph.dtype))
    if clip_fea is not None:
        if vision_in is None:
            raise ValueError("clip_fea was given but this model has no image-token input (no vision_in weights)")
        check_tokens("clip_fea", clip_fea, b, vision_in.proj[0].normalized_shape[0])
        parts.insert(0, (vision_in(clip_fea) + w[VISION]).to(txt.dtype))
    return torch.cat(parts, dim=1), sum(p.shape[1] for p in parts[:-1])

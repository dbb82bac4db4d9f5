"""PyTorch reference for kernels.svg_profile: SVG's sampled-row errors of the spatial and temporal
band masks, one head at a time in float64 with a plain masked softmax (no chunking, no tricks)."""
from __future__ import annotations

import math
from typing import Optional

import torch


def _masked_softmax_attention(scores: torch.Tensor, allowed: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax over the allowed keys @ v; a row with no allowed key gives 0."""
    s = scores.masked_fill(~allowed, float("-inf"))
    top = s.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(s - top)
    return (p @ v) / p.sum(-1, keepdim=True).clamp_min(1e-300)


def svg_errors_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, band: torch.Tensor,
                   inv: torch.Tensor, block: int, key_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[H, 2] float64: per head, the mean over (batch, sampled rows, head_dim) of the squared
    difference between attention restricted to the spatial (column 0) / temporal (column 1) band
    and exact attention. q, k, v [B, H, L, D]; rows [H, n] query rows; band [nb, nb] bool block
    table; inv [L]: a token's position in the temporal order; key_bias [B|1, L] additive or None."""
    b, heads, length, d = q.shape
    band = band.bool().cpu()
    inv = inv.long().cpu()
    keys_spatial = torch.arange(length) // block
    keys_temporal = inv // block
    bias = None if key_bias is None else key_bias.double().cpu().expand(b, length)
    errors = torch.zeros(heads, 2, dtype=torch.float64)
    for h in range(heads):
        r = rows[h].long().cpu()
        qh = q[:, h].double().cpu()[:, r]                       # [B, n, D]
        kh, vh = k[:, h].double().cpu(), v[:, h].double().cpu()  # [B, L, D]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)       # [B, n, L]
        if bias is not None:
            scores = scores + bias[:, None, :]
        everything = torch.ones(scores.shape[1:], dtype=torch.bool)
        exact = _masked_softmax_attention(scores, everything, vh)
        # the row's query block and each key's block, in the original / the temporal token order
        masks = (band[keys_spatial[r]][:, keys_spatial], band[keys_temporal[r]][:, keys_temporal])
        for c, allowed in enumerate(masks):
            approx = _masked_softmax_attention(scores, allowed, vh)
            errors[h, c] = ((approx - exact) ** 2).mean()
    return errors


__all__ = ["svg_errors_ref"]

"""PyTorch reference for kernels.gram: X^T X per (batch, head) slice in float64."""
from __future__ import annotations

import torch


def head_gram_ref(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x [B, L, H*D] -> float64 [B, H, D, D], each head's D x D Gram matrix."""
    b, length, hidden = x.shape
    xh = x.double().reshape(b, length, heads, hidden // heads).permute(0, 2, 1, 3)
    return xh.transpose(-1, -2) @ xh

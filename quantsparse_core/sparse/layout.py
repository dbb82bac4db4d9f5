"""Token orders of the joint sequence [text, video].

Video tokens arrive frame-major (t, y, x). The temporal order is position-major (y, x, t), so the
same spatial location across frames is contiguous and a diagonal band of blocks in that order
connects each token to itself in other frames. Text tokens stay first and in place in both orders.
"""
from __future__ import annotations

from typing import Optional

import torch


def check_layout(seq_len: int, txt_len: int, grid) -> None:
    """Fail loudly when the token sequence cannot be the [text, video grid] layout we permute."""
    t, h, w = (int(n) for n in grid)
    if txt_len < 0 or min(t, h, w) < 1 or seq_len != txt_len + t * h * w:
        raise ValueError(
            f"sequence length {seq_len} does not match text length {txt_len} + frames x rows x cols "
            f"{t} x {h} x {w} = {txt_len + t * h * w}; the latent shape does not match the token sequence")


def temporal_permutation(txt_len: int, grid, seq_len: Optional[int] = None, device=None) -> torch.Tensor:
    """Index tensor `perm` such that `x[..., perm, :]` is x in temporal (text, y, x, t) order.

    Pass `seq_len` to have the layout validated against the grid.
    """
    t, h, w = (int(n) for n in grid)
    if seq_len is not None:
        check_layout(seq_len, txt_len, grid)
    video = torch.arange(t * h * w, device=device).view(t, h, w).permute(1, 2, 0).reshape(-1)
    return torch.cat([torch.arange(txt_len, device=device), video + txt_len])


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Index tensor that undoes `perm`: `x[..., perm, :][..., inv, :] == x`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv

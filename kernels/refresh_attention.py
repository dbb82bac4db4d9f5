"""SSAR's refresh attention from one read of the keys: O_full and D = O_full - O_sparse.

A refresh step needs the exact attention output and the sparse one under the new mask. Computed
separately, dense cuDNN SDPA reads every key block and the sparse kernel reads the mask's blocks a
second time (313 + 53 ms per 720p layer on an H200 at 15%). Here the block-sparse kernel runs over
the mask and over its complement (disjoint key sets that together are all keys), each also writing
its rows' log-sum-exp, and the two softmaxes merge exactly:

    O_full = O_sparse + D,   D = w (O_rest - O_sparse),   w = 2^lse_rest / (2^lse_sparse + 2^lse_rest)

D comes in fp32 from the two outputs, without the rounding of a bf16 O_full. A row whose complement
is empty (text rows, dense heads) has lse_rest = -inf, w = 0. The reference is
kernels/refresh_attention_ref.py (dense SDPA and the sparse reference, subtracted).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .sparse_attention import check_call, mask_arguments, sparse_attention


def complement(block_mask):
    """The key blocks the mask leaves out, per head and in each head's own order (same kinds). Not
    cached: a refresh uses it once, and its ~85%-dense index would otherwise live as long as the mask."""
    from quantsparse_core.sparse.masks import BlockMask

    return BlockMask(~block_mask.keep, list(block_mask.kinds), block_mask.block, block_mask.seq_len)


def merge(sparse: torch.Tensor, lse_sparse: torch.Tensor, rest: torch.Tensor,
          lse_rest: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O_full in the outputs' dtype, D = O_full - O_sparse in fp32) from two attentions over disjoint
    key sets: outputs [B, L, H*D], base-2 log-sum-exps [B, H, L]."""
    b, length, hd = sparse.shape
    heads = lse_sparse.shape[1]
    top = torch.maximum(lse_sparse, lse_rest)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e_rest = torch.exp2(lse_rest - top)
    w = e_rest / (torch.exp2(lse_sparse - top) + e_rest).clamp_min(torch.finfo(torch.float32).tiny)
    d = rest.to(torch.float32, copy=True)  # the caller's tensors stay as they are
    d -= sparse
    d.view(b, length, heads, hd // heads).mul_(w.transpose(1, 2).unsqueeze(-1))
    full = (d + sparse).to(sparse.dtype)
    return full, d


def refresh_attention(q, k, v, mask, block_mask, txt_len: int, grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O_full [B, L, H*D] in q's dtype, D = O_full - O_sparse [B, L, H*D] fp32) through the Triton
    kernel: the mask's keys and the complement's, merged by log-sum-exp. q, k, v [B, H, L, D]; mask:
    the model's additive key mask or None; block_mask: the refresh's new BlockMask."""
    check_call(q, block_mask, txt_len, grid)
    b, heads, length, _ = q.shape
    runs = []
    for m in (block_mask, complement(block_mask)):
        lse = torch.empty(b, heads, length, dtype=torch.float32, device=q.device)
        out = sparse_attention(q, k, v, lse=lse, **mask_arguments(q, mask, m, txt_len, grid))
        runs += [out, lse]
    return merge(*runs)


__all__ = ["refresh_attention", "complement", "merge"]

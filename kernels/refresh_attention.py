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

from .sparse_attention import sparse_attention


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
    full = torch.add(d, sparse, out=torch.empty_like(sparse))  # rounded once, without an fp32 [B, L, H*D] temporary
    return full, d


def refresh_attention(q, k, v, kv_index, kv_count, rest_index, rest_count, *, block: int = 128, key_bias=None,
                      perm=None, permuted_heads=None, precision: str = "bf16") -> Tuple[torch.Tensor, torch.Tensor]:
    """(O_full [B, L, H*D] in q's dtype, D = O_full - O_sparse [B, L, H*D] fp32) through the Triton
    kernel: the mask's key blocks (kv_index / kv_count) and the complement's (rest_index / rest_count:
    every other key block, same head orders), merged by log-sum-exp. q, k, v [B, H, L, D]; the other
    keywords as kernels.sparse_attention takes them (precision: both runs)."""
    b, heads, length, _ = q.shape
    runs = []
    # the complement's heavy rows are none: the text rows the mask run schedules first visit every key block there
    for index, count, heavy in ((kv_index, kv_count, None), (rest_index, rest_count, 0)):
        lse = torch.empty(b, heads, length, dtype=torch.float32, device=q.device)
        out = sparse_attention(q, k, v, index, count, block=block, key_bias=key_bias, perm=perm,
                               permuted_heads=permuted_heads, lse=lse, precision=precision, heavy_rows=heavy)
        runs += [out, lse]
    return merge(*runs)


__all__ = ["refresh_attention", "merge"]

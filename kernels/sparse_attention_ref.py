"""PyTorch references for kernels.sparse_attention.

- `block_sparse_attention_ref`: the core reference (quantsparse_core.sparse.reference, chunked, no
  L x L matrix) plus the SSAR correction added in fp32: the CPU path of the dispatching wrapper.
- `dense_masked_attention_f64`: the plainest possible ground truth for tests: the block mask
  expanded to a token mask, one full float64 softmax per head, permutation applied by indexing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from quantsparse_core.sparse.correction import as_correction
from quantsparse_core.sparse.reference import block_sparse_attention as core_block_sparse_attention


def block_sparse_attention_ref(q, k, v, mask, block_mask, txt_len: int, grid, correction=None) -> torch.Tensor:
    """The core reference's output (q's dtype), plus `correction` ([B, L, H*D] tensor or Correction)
    materialised and added in fp32."""
    out = core_block_sparse_attention(q, k, v, mask, block_mask, txt_len, grid)
    correction = as_correction(correction)
    if correction is None:
        return out
    return (out.float() + correction.to(out.device).materialize()).to(q.dtype)


def dense_masked_attention_f64(q, k, v, keep: torch.Tensor, block: int, *, key_bias=None, perm=None,
                               permuted_heads: Optional[Sequence[bool]] = None,
                               correction=None) -> torch.Tensor:
    """float64 [B, L, H*D]. keep: [H, nq, nk] bool in each head's own order; key_bias [B|1, L] in the
    original order; heads flagged in permuted_heads are computed on x[:, perm] and put back.
    A query row with no allowed key gives 0."""
    b, heads, length, d = q.shape
    out = torch.zeros(b, length, heads, d, dtype=torch.float64)
    tok_block = torch.arange(length) // block
    for h in range(heads):
        order = perm.long().cpu() if permuted_heads is not None and permuted_heads[h] else torch.arange(length)
        qh, kh, vh = (x[:, h].double().cpu()[:, order] for x in (q, k, v))
        allowed = keep[h].cpu()[tok_block][:, tok_block]  # [L, L] token mask
        s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        if key_bias is not None:
            s = s + key_bias.double().cpu()[:, order][:, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        top = s.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        p = torch.exp(s - top)
        oh = (p @ vh) / p.sum(-1, keepdim=True).clamp_min(1e-300)
        out[:, order, h] = oh
    out = out.reshape(b, length, heads * d)
    correction = as_correction(correction)
    if correction is not None:
        out = out + correction.to("cpu").materialize().double()
    return out


__all__ = ["block_sparse_attention_ref", "core_block_sparse_attention", "dense_masked_attention_f64"]

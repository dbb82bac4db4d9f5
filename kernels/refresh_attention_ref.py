"""PyTorch reference for kernels.refresh_attention: dense attention and the sparse reference run
separately, D subtracted in fp32 (what the SSAR refresh does without the kernel)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .sparse_attention_ref import sparse_attention_ref


def refresh_attention_ref(q, k, v, kv_index, kv_count, *, block: int = 128, key_bias=None, perm=None,
                          permuted_heads=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O_full [B, L, H*D] in q's dtype, O_full - O_sparse in fp32): dense SDPA under key_bias
    ([B|1, L] additive or None) and the sparse reference over the listed key blocks."""
    b, heads, length, d = q.shape
    m = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, length, heads * d)
    sparse = sparse_attention_ref(q, k, v, kv_index, kv_count, block=block, key_bias=key_bias, perm=perm,
                                  permuted_heads=permuted_heads)
    return full, full.float() - sparse.float()


__all__ = ["refresh_attention_ref"]

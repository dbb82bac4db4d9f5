"""PyTorch reference for kernels.refresh_attention: dense attention and the sparse reference run
separately, D subtracted in fp32 (what the SSAR refresh does without the kernel)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from quantsparse_core.sparse.reference import block_sparse_attention as core_block_sparse_attention


def refresh_attention_ref(q, k, v, mask, block_mask, txt_len: int, grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """(O_full [B, L, H*D] in q's dtype, O_full - O_sparse in fp32). mask: additive, broadcastable
    to [B, H, L, L] ([B, 1, L] key masks included) or None."""
    b, heads, length, d = q.shape
    m = mask.unsqueeze(1) if mask is not None and mask.ndim == 3 else mask
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, length, heads * d)
    sparse = core_block_sparse_attention(q, k, v, mask, block_mask, txt_len, grid)
    return full, full.float() - sparse.float()


__all__ = ["refresh_attention_ref"]

"""PyTorch reference for kernels.residual: an SSAR refresh's residual and its drift from one pass."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def refresh_residuals_ref(full: torch.Tensor, sparse: torch.Tensor, prev: Optional[torch.Tensor],
                          out_dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(D = full - sparse computed in fp32 and stored in out_dtype, D2 = D - prev in fp32 or None without
    prev). full, sparse: [B, L, H*D] attention outputs; prev: the previous refresh's stored D (any float
    dtype, same shape) or None."""
    d = full.to(torch.float32, copy=True).sub_(sparse)
    d2 = None if prev is None else prev.to(torch.float32, copy=True).neg_().add_(d)  # = d - prev, bit for bit
    return d.to(out_dtype), d2


__all__ = ["refresh_residuals_ref"]

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


def int8_residuals_ref(x: torch.Tensor, sparse: Optional[torch.Tensor] = None,
                       prev_codes: Optional[torch.Tensor] = None, prev_scale: Optional[torch.Tensor] = None):
    """(codes, scale, D2) for the gpu-int8 cache: D = x - sparse in fp32 (x alone without sparse) as int8 codes
    with one absmax scale per row (scale = max(|D|) x fp32(1/127): a product, so that the CPU and CUDA give the
    same scale; codes = round-half-even(D / scale) clamped to +-127), and D2 = D - prev_codes * prev_scale in
    fp32 (None without prev_codes)."""
    d = x.to(torch.float32, copy=True)
    if sparse is not None:
        d.sub_(sparse)
    scale = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * (1.0 / 127.0)
    codes = torch.round(d / scale).clamp(-127, 127).to(torch.int8)
    d2 = None
    if prev_codes is not None:
        prev = prev_codes.float() * prev_scale.reshape(*prev_codes.shape[:-1], 1).float()
        d2 = prev.neg_().add_(d)  # = d - prev, bit for bit
    return codes, scale, d2


__all__ = ["refresh_residuals_ref", "int8_residuals_ref"]

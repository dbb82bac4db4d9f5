"""PyTorch reference for kernels.wan_qk_norm_rope: Wan's q/k RMSNorm over the whole width (all heads
together, as WanSelfAttention's norm_q / norm_k: F.rms_norm in fp32, x * rstd * weight rounded once to the
model dtype), then RoPE per head in fp32 from the [.., D/2, 2, 2] table, rounded to the model dtype.
Written out op by op, independent of the model code."""
from __future__ import annotations

import torch


def wan_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, L, C], weight [C]: RMSNorm over C."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def wan_rope_ref(x: torch.Tensor, heads: int, table: torch.Tensor) -> torch.Tensor:
    """x [B, L, H*D]; table [B|1, 1, L, D/2, 2, 2]: per head, pair j -> t[j, 0] x_even + t[j, 1] x_odd (fp32)."""
    b, length, _ = x.shape
    xf = x.float().view(b, length, heads, -1, 2)
    t = table.float()[:, 0, :, None]                      # [B|1, L, 1, D/2, 2, 2]
    o0 = t[..., 0, 0] * xf[..., 0] + t[..., 0, 1] * xf[..., 1]
    o1 = t[..., 1, 0] * xf[..., 0] + t[..., 1, 1] * xf[..., 1]
    return torch.stack((o0, o1), dim=-1).reshape(b, length, -1).to(x.dtype)


def wan_qk_ref(q, k, heads: int, wq, wk, table, eps: float):
    """(RoPE(RMSNorm(q)), RoPE(RMSNorm(k))), each [B, L, H*D] like q and k."""
    return (wan_rope_ref(wan_rms_norm_ref(q, wq, eps), heads, table),
            wan_rope_ref(wan_rms_norm_ref(k, wk, eps), heads, table))

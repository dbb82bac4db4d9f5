"""PyTorch reference for kernels.qk_norm_rope: per-head RMSNorm of q and k as F.rms_norm computes it
for nn.RMSNorm(eps=None) in torch >= 2.8 (fp32 math, eps = fp32 machine epsilon, x * rstd * weight
rounded once to the model dtype), then RoPE in fp32 from the [.., D/2, 2, 2] table, rounded to the
model dtype; v passed through. Written out op by op, independent of the model code."""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)
    return (xf * rstd * weight.float()).to(x.dtype)


def rope_ref(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; table [B, 1, L, D/2, 2, 2]: out pair j = t[j, 0] x_even + t[j, 1] x_odd (fp32)."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    t = table.float()
    o0 = t[..., 0, 0] * x0 + t[..., 0, 1] * x1
    o1 = t[..., 1, 0] * x0 + t[..., 1, 1] * x1
    return torch.stack((o0, o1), dim=-1).flatten(-2).to(x.dtype)


def heads_of(qkv: torch.Tensor, heads: int):
    """[B, L, 3*H*D] -> q, k, v as [B, H, L, D] views."""
    b, l, _ = qkv.shape
    return qkv.view(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)


def single_qkv_ref(qkv, heads: int, wq, wk, table):
    q, k, v = heads_of(qkv, heads)
    return rope_ref(rms_norm_ref(q, wq), table), rope_ref(rms_norm_ref(k, wk), table), v


def double_qkv_ref(txt_qkv, img_qkv, heads: int, txt_wq, txt_wk, img_wq, img_wk, table):
    tq, tk, tv = heads_of(txt_qkv, heads)
    iq, ik, iv = heads_of(img_qkv, heads)
    q = torch.cat((rms_norm_ref(tq, txt_wq), rms_norm_ref(iq, img_wq)), dim=2)
    k = torch.cat((rms_norm_ref(tk, txt_wk), rms_norm_ref(ik, img_wk)), dim=2)
    return rope_ref(q, table), rope_ref(k, table), torch.cat((tv, iv), dim=2)

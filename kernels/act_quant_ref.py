"""PyTorch reference for kernels.act_quant: the exact arithmetic of QuantLinear's real mode.

x -> x * inv_smooth -> (optional) Kronecker rotation r1^T X r2 -> per-token absmax scale with clip
-> int8 codes (6-bit codes lie in [-31, 31]). Returns (codes int8 [M, K], scale fp32 [M, 1]).
"""
from __future__ import annotations

import torch

EPS = 1e-8


def act_quant_ref(x: torch.Tensor, bits: int = 8, inv_smooth: torch.Tensor | None = None,
                  clip: torch.Tensor | float = 1.0, r1: torch.Tensor | None = None,
                  r2: torch.Tensor | None = None):
    qmax = 2 ** (bits - 1) - 1
    xt = x.reshape(-1, x.shape[-1]).float()
    if inv_smooth is not None:
        xt = xt * inv_smooth.float()
    if r1 is not None:
        n1, n2 = r1.shape[0], r2.shape[0]
        xt = torch.matmul(torch.matmul(r1.float().t(), xt.reshape(-1, n1, n2)), r2.float()).reshape(xt.shape)
    scale = (xt.abs().amax(dim=-1, keepdim=True) * clip).clamp_min(EPS) / qmax
    codes = torch.clamp(torch.round(xt / scale), -qmax, qmax).to(torch.int8)
    return codes, scale

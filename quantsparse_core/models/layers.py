"""Layers of the HunyuanVideo DiT (embedders, modulation, RoPE, attention weights), written to match
ComfyUI's math and key names. The blocks built from them are in blocks.py."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of `time_factor * t`, frequencies max_period^(-i/half)."""
    t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope_table(pos: torch.Tensor, axes: tuple, theta: float) -> torch.Tensor:
    """Rotation coefficients for 3-D positions `pos` [B, L, 3] -> [B, 1, L, head_dim/2, 2, 2] (fp32).

    Each axis a gets axes[a] channels (axes[a]/2 rotated pairs) with frequencies
    theta^(-2i/axes[a]); text tokens sit at position 0 (identity rotation).
    """
    mats = []
    for a, dim in enumerate(axes):
        exponent = torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64)
        omega = (1.0 / theta ** exponent).to(torch.float32).to(pos.device)
        ang = pos[..., a].to(torch.float32)[..., None] * omega          # [B, L, dim/2]
        cos, sin = torch.cos(ang), torch.sin(ang)
        mats.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))
    return torch.cat(mats, dim=-3).unsqueeze(1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, H, L, D] by `table` (from rope_table)."""
    pairs = x.to(table.dtype).unflatten(-1, (-1, 1, 2))                  # [B, H, L, D/2, 1, 2]
    out = table[..., 0] * pairs[..., 0] + table[..., 1] * pairs[..., 1]  # [B, H, L, D/2, 2]
    return out.flatten(-2).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden, device=None, dtype=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, device=device, dtype=dtype)
        self.out_layer = nn.Linear(hidden, hidden, device=device, dtype=dtype)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """adaLN: vec -> (shift, scale, gate) once (single) or twice (double), each [B, 1, C]."""

    def __init__(self, hidden, count, device=None, dtype=None):
        super().__init__()
        self.count = count
        self.lin = nn.Linear(hidden, count * hidden, device=device, dtype=dtype)

    def forward(self, vec):
        return self.lin(F.silu(vec[:, None, :])).chunk(self.count, dim=-1)


class QKNorm(nn.Module):
    def __init__(self, head_dim, device=None, dtype=None):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=None, device=device, dtype=dtype)
        self.key_norm = nn.RMSNorm(head_dim, eps=None, device=device, dtype=dtype)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class QKVAttention(nn.Module):
    """Weights of one stream's attention: fused qkv, per-head q/k RMSNorm, output projection."""

    def __init__(self, hidden, head_dim, device=None, dtype=None):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, device=device, dtype=dtype)
        self.norm = QKNorm(head_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, device=device, dtype=dtype)


def mlp(hidden, inner, act: nn.Module, device=None, dtype=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, inner, device=device, dtype=dtype), act,
                         nn.Linear(inner, hidden, device=device, dtype=dtype))


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)


def split_heads(qkv: torch.Tensor, heads: int):
    """[B, L, 3*H*D] -> three [B, H, L, D]."""
    b, l, _ = qkv.shape
    return qkv.view(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _no_affine_ln(hidden, device, dtype):
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)

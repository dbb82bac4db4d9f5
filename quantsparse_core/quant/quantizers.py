"""Uniform symmetric integer quantizers (weights per output channel, activations per token).

q = clamp(round(x / s), -qmax, qmax), s = clip * max|x| / qmax, qmax = 2^(bits-1) - 1.
The learnable clipping factor is trained through a straight-through estimator on the rounding.
"""
from __future__ import annotations

import torch

SUPPORTED_WEIGHT_BITS = (4, 6, 8)
SUPPORTED_ACT_BITS = (6, 8, 16)  # 16 = keep activations in floating point (weight-only)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_bits(w_bits: int, a_bits: int) -> None:
    if w_bits not in SUPPORTED_WEIGHT_BITS:
        raise ValueError(f"weight bits {w_bits} unsupported; choose one of {SUPPORTED_WEIGHT_BITS}")
    if a_bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"activation bits {a_bits} unsupported; choose one of {SUPPORTED_ACT_BITS} "
                         "(16 means weight-only)")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def absmax_scale(x: torch.Tensor, bits: int, dim: int = -1, clip: torch.Tensor | float = 1.0,
                 eps: float = 1e-8) -> torch.Tensor:
    """Per-row scale along `dim` reduced away (keepdim) so that clip * max|x| maps to qmax."""
    return (x.abs().amax(dim=dim, keepdim=True) * clip).clamp_min(eps) / qmax(bits)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with STE rounding (differentiable in x and scale)."""
    m = qmax(bits)
    return torch.clamp(round_ste(x / scale), -m, m) * scale


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 storage) for x at `scale`."""
    m = qmax(bits)
    return torch.clamp(torch.round(x / scale), -m, m).to(torch.int8)


def quantize_per_token(x: torch.Tensor, bits: int):
    """Dynamic per-token activation quantization: (int8 codes, fp32 scale [..., 1])."""
    scale = absmax_scale(x.float(), bits, dim=-1)
    return quantize(x.float(), scale, bits), scale

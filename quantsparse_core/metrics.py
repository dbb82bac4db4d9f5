"""Quality metrics: PSNR and SSIM over videos, relative error of attention outputs."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_video(x: torch.Tensor) -> torch.Tensor:
    """Accept [3, F, H, W] or [B, 3, F, H, W]; return [B, 3, F, H, W] in float64."""
    if x.ndim == 4:
        x = x.unsqueeze(0)
    if x.ndim != 5:
        raise ValueError(f"expected a video [B, C, F, H, W] or [C, F, H, W], got shape {tuple(x.shape)}")
    return x.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole video(s); inf when identical."""
    a, b = _as_video(a), _as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = torch.mean((a - b) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size=11, sigma=1.5, dtype=torch.float64):
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid region)
    over every frame and color channel of the video(s)."""
    a, b = _as_video(a), _as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    bsz, c, f, h, w = a.shape
    a = a.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    b = b.permute(0, 2, 1, 3, 4).reshape(-1, 1, h, w)
    win = _gaussian_window().to(a.device)[None, None]
    mu_a, mu_b = F.conv2d(a, win), F.conv2d(b, win)
    var_a = F.conv2d(a * a, win) - mu_a ** 2
    var_b = F.conv2d(b * b, win) - mu_b ** 2
    cov = F.conv2d(a * b, win) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean().item()


def relative_error(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """||approx - ref|| / ||ref|| in float64 (e.g. sparse vs dense attention outputs)."""
    ref = ref.double()
    denom = ref.norm().item()
    if denom == 0:
        raise ValueError("reference is all zeros: relative error undefined")
    return (approx.double() - ref).norm().item() / denom

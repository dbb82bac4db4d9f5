"""A fixed latent codec for the tiny model: 4x4 RGB pixel patches -> 16 DCT channels.

No learned weights, so results are viewable without a VAE: each 4x4x3 patch is projected on 16
orthonormal basis vectors (per color the 4 lowest 2-D DCT-II frequencies, plus 4 more luma
frequencies); decoding is the transpose, i.e. the least-squares reconstruction.
"""
from __future__ import annotations

import math

import torch

_COLOR_FREQS = ((0, 0), (0, 1), (1, 0), (1, 1))
_LUMA_FREQS = ((0, 2), (2, 0), (1, 2), (2, 1))
# Latent std of 1 on training videos: the std of unscaled latents of 256 random videos from
# shapes.render (generator seed 0) measured 0.645 -> scale 1 / 0.645.
LATENT_SCALE = 1.55


def _dct_matrix(n: int = 4) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def codec_basis() -> torch.Tensor:
    """[16, 3, 4, 4] float64, orthonormal rows when flattened to 48."""
    c = _dct_matrix()
    rows = []
    for ch in range(3):
        for u, v in _COLOR_FREQS:
            b = torch.zeros(3, 4, 4, dtype=torch.float64)
            b[ch] = torch.outer(c[u], c[v])
            rows.append(b)
    for u, v in _LUMA_FREQS:
        rows.append(torch.outer(c[u], c[v]).expand(3, 4, 4) / math.sqrt(3.0))
    return torch.stack(rows)


class LatentCodec:
    SPATIAL = 4
    CHANNELS = 16

    def __init__(self):
        self._basis = codec_basis()

    def _b(self, like: torch.Tensor) -> torch.Tensor:
        return self._basis.to(device=like.device, dtype=like.dtype)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [0, 1] -> [B, 16, F, H/4, W/4]."""
        b, c, f, h, w = video.shape
        if c != 3 or h % 4 or w % 4:
            raise ValueError(f"video must be [B, 3, F, H, W] with H and W divisible by 4, got {tuple(video.shape)}")
        patches = (video - 0.5).reshape(b, 3, f, h // 4, 4, w // 4, 4)
        return torch.einsum("bcfyiwj,kcij->bkfyw", patches, self._b(video)) * LATENT_SCALE

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, 16, F, h, w] -> [B, 3, F, 4h, 4w] clamped to [0, 1]."""
        b, k, f, h, w = latent.shape
        if k != self.CHANNELS:
            raise ValueError(f"latent must have {self.CHANNELS} channels, got {k}")
        patches = torch.einsum("bkfyw,kcij->bcfyiwj", latent / LATENT_SCALE, self._b(latent))
        return (patches.reshape(b, 3, f, 4 * h, 4 * w) + 0.5).clamp(0, 1)

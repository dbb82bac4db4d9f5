"""A fixed latent codec for the tiny model: 4x4 RGB pixel patches -> 16 DCT channels.

It has no learned weights, so the tiny model's latents can be turned into viewable videos without a
VAE. Each 4x4x3 patch (minus 0.5) is projected on 16 orthonormal 48-d basis vectors: per color
channel the 4 lowest 2-D DCT-II frequencies (0,0), (0,1), (1,0), (1,1) (12 channels), plus 4 luma
(R = G = B) vectors for frequencies (0,2), (2,0), (1,2), (2,1) that sharpen edges. Decoding is the
transpose, i.e. the least-squares reconstruction from the kept coefficients.
"""
from __future__ import annotations

import math

import torch

COLOR_FREQS = ((0, 0), (0, 1), (1, 0), (1, 1))
LUMA_FREQS = ((0, 2), (2, 0), (1, 2), (2, 1))

# Makes latents of training videos std ~1, as diffusion training expects. Measured once: the std of
# the unscaled latents of 1024 videos from shapes.render(random_scenes(1024, Generator().manual_seed(0)),
# frames=8, size=128, generator=<same generator>) is 0.6470 -> scale 1 / 0.6470 ~= 1.55 (scaled std 1.003).
LATENT_SCALE = 1.55


def dct_matrix(n: int = 4) -> torch.Tensor:
    """Orthonormal DCT-II matrix [n, n] in float64; row k is frequency k sampled at pixels 0..n-1."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    x = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * x + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def _gram_schmidt(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormalise rows in order (earlier rows are kept as they are, up to normalisation)."""
    out = []
    for r in rows:
        for q in out:
            r = r - (r @ q) * q
        out.append(r / r.norm())
    return torch.stack(out)


def _orthonormal(rows: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """Return rows unchanged if already orthonormal, else Gram-Schmidt them (decode must equal a projection)."""
    err = (rows @ rows.T - torch.eye(rows.shape[0], dtype=rows.dtype)).abs().max()
    return rows if err <= tol else _gram_schmidt(rows)


def codec_basis() -> torch.Tensor:
    """The 16 basis vectors as [16, 3, 4, 4] float64 (orthonormal when flattened to [16, 48])."""
    c = dct_matrix(4)
    rows = []
    for channel in range(3):
        for u, v in COLOR_FREQS:
            b = torch.zeros(3, 4, 4, dtype=torch.float64)
            b[channel] = torch.outer(c[u], c[v])
            rows.append(b.reshape(48))
    for u, v in LUMA_FREQS:
        rows.append((torch.outer(c[u], c[v]) / math.sqrt(3.0)).expand(3, 4, 4).reshape(48))
    return _orthonormal(torch.stack(rows)).reshape(16, 3, 4, 4)


class LatentCodec:
    """video [B, 3, F, H, W] in [0, 1] <-> latent [B, 16, F, H/4, W/4]; works on any device and float dtype."""
    SPATIAL = 4
    CHANNELS = 16

    def __init__(self):
        self._basis64 = codec_basis()
        self._basis_cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _basis(self, like: torch.Tensor) -> torch.Tensor:
        """The basis on like's device and dtype, copied there once."""
        key = (like.device, like.dtype)
        if key not in self._basis_cache:
            self._basis_cache[key] = self._basis64.to(device=like.device, dtype=like.dtype)
        return self._basis_cache[key]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [0, 1] -> [B, 16, F, H/4, W/4], scaled to std ~1 on training videos."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"video must be a float tensor in [0, 1], got {video.dtype}")
        b, _, f, h, w = video.shape
        s = self.SPATIAL
        if h % s or w % s:
            raise ValueError(f"video height and width must be divisible by {s}, got {h} x {w}")
        patches = (video - 0.5).reshape(b, 3, f, h // s, s, w // s, s)
        return torch.einsum("bcfyiwj,kcij->bkfyw", patches, self._basis(video)) * LATENT_SCALE

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, 16, F, h, w] -> [B, 3, F, 4h, 4w] clamped to [0, 1] (the least-squares patch reconstruction)."""
        if latent.ndim != 5 or latent.shape[1] != self.CHANNELS:
            raise ValueError(f"latent must be [B, {self.CHANNELS}, F, h, w], got {tuple(latent.shape)}")
        b, _, f, h, w = latent.shape
        s = self.SPATIAL
        patches = torch.einsum("bkfyw,kcij->bcfyiwj", latent / LATENT_SCALE, self._basis(latent))
        return (patches.reshape(b, 3, f, h * s, w * s) + 0.5).clamp(0, 1)

"""SSAR's rank-r truncation (METHOD.md §4: C = D + SVD_r(D2)): per (batch, head) truncated SVD of
an L x head_dim residual slice through its D x D Gram matrix, and the factor algebra around it."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import dispatch


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    b, length, hidden = x.shape
    return x.reshape(b, length, heads, hidden // heads).transpose(1, 2)


def heads_last(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def gram_matrices(xh: torch.Tensor) -> torch.Tensor:
    """X^T X of each (batch, head) slice of xh [B, H, L, D], float64 [B, H, D, D]. kernels.gram where
    quantsparse_core.dispatch picks Triton and xh is a heads_first view of an fp32 [B, L, H*D] (it reads the
    residual once; bf16 hi/lo products on the tensor cores, ~1e-5 relative; 0.9 vs 3.5 ms per 720p
    layer on an H200); else one head at a time in float64 (a float64 copy of the whole residual
    would be 2.9 GB at 720p)."""
    b, h, length, d = xh.shape
    if xh.transpose(1, 2).is_contiguous():
        x = xh.transpose(1, 2).reshape(b, length, h * d)          # a view: the residual as stored
        kernel = dispatch.head_gram_kernel(x, h)
        if kernel is not None:
            return kernel(x, h)
    gram = torch.empty(b, h, d, d, dtype=torch.float64, device=xh.device)
    for i in range(b):
        for j in range(h):
            xd = xh[i, j].double()
            gram[i, j] = xd.T @ xd
    return gram


def top_vectors(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-`rank` eigenvectors of each Gram matrix [..., D, D], largest first, fp32 [..., D, r]."""
    _, vecs = torch.linalg.eigh(gram)                                # ascending eigenvalues
    return vecs[..., -rank:].flip(-1).to(torch.float32)


def factor_rank(rank: int, length: int, dim: int) -> int:
    """The rank a truncation of an L x D slice can have."""
    return min(rank, dim, length)


def truncated_factors(x: torch.Tensor, heads: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of each (batch, head) L x head_dim slice of x [B, L, H*D].
    Returns (U S [B, H, L, r], V^T [B, H, r, D]) in fp32.

    Computed from the D x D Gram matrix X^T X (float64, eigh): its top-r eigenvectors are the top-r
    right singular vectors V_r, and X V_r = U_r S_r. A direct SVD of the tall L x 128 matrices was
    most of a refresh step at 13B size (L ~ 10^5, 24 heads x 60 blocks); this is one thin GEMM.
    """
    xh = heads_first(x.float(), heads)                               # [B, H, L, D]
    v = top_vectors(gram_matrices(xh), factor_rank(rank, xh.shape[-2], xh.shape[-1]))
    return project(xh, v)


def project(xh: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(X V, V^T) for X [B, H, L, D] and orthonormal V [B, H, D, r]: the truncation's factors."""
    return xh.float() @ v, v.transpose(-1, -2).contiguous()


def from_factors(us: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Inverse of truncated_factors: [B, L, H*D] fp32."""
    return heads_last(us.float() @ vh.float())


def svd_truncate(x: torch.Tensor, heads: int, rank: int) -> torch.Tensor:
    """Rank-`rank` truncation per (batch, head) of x [B, L, H*D] in fp32; rank 0 returns x (no truncation)."""
    if rank == 0:
        return x.float()
    return from_factors(*truncated_factors(x, heads, rank))

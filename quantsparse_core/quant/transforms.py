"""Outlier transforms applied to a linear layer's input: smoothing (per channel) and a rotation
stored as the Kronecker product of two small orthogonal factors.

y = x W^T = (x diag(1/s) R) (W diag(s) R)^T for any s > 0 and orthogonal R, so the weight side can
be folded into the stored weights while the activation side runs online.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def kron_factors(n: int) -> tuple:
    """Split n into n1 * n2 with n1 <= n2 and n1 as close to sqrt(n) as possible."""
    n1 = int(math.isqrt(n))
    while n % n1:
        n1 -= 1
    return n1, n // n1


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix for n a power of two, else an orthonormal DCT-II basis
    (also flat: every entry of every row has the same magnitude order, which spreads outliers)."""
    if n & (n - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / math.sqrt(n)
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def apply_kron(x: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """x @ kron(r1, r2) without forming the n x n matrix: reshape the last dim to (n1, n2),
    compute r1^T X r2."""
    n1, n2 = r1.shape[0], r2.shape[0]
    xs = x.reshape(*x.shape[:-1], n1, n2)
    return torch.matmul(torch.matmul(r1.transpose(0, 1), xs), r2).reshape(x.shape)


class OrthogonalFactor(nn.Module):
    """An n x n orthogonal matrix kept exactly orthogonal while trained: Q = Q0 @ cayley(A),
    cayley(A) = (I - A)^-1 (I + A) with A = P - P^T skew-symmetric (P starts at zero)."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.register_buffer("base", init.double())
        self.param = nn.Parameter(torch.zeros(init.shape, dtype=torch.float32, device=init.device))

    def forward(self) -> torch.Tensor:
        # Solved in float64 so the factor is orthogonal to rounding, then cast to the parameter dtype.
        p = self.param.double()
        a = p - p.transpose(0, 1)
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return (self.base.double() @ torch.linalg.solve(eye - a, eye + a)).to(self.param.dtype)

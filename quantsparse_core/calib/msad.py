"""Multi-Scale Salient Attention Distillation losses (METHOD.md §2).

Global: average-pool Q and K along the token sequence (stride s, last window partial), attention
of the pooled tokens. Local: the k key tokens that receive the most attention in the
full-precision model (summed over heads and queries, computed in query tiles so no L x L tensor
exists), used as queries against all keys. Both compared by MSE between FP and quantized blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _valid_keys(mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
    """[B, L] float 1/0 from the additive key mask [B, 1, L] (None: all valid)."""
    if mask is None:
        return torch.ones(1, length, device=device)
    return (mask.reshape(mask.shape[0], -1) > -1).float()


def pool_tokens(x: torch.Tensor, stride: int, valid: torch.Tensor) -> torch.Tensor:
    """Mean of each window of `stride` tokens over valid tokens: [B, H, L, D] -> [B, H, ceil(L/s), D]."""
    b, h, l, d = x.shape
    n = math.ceil(l / stride)
    pad = n * stride - l
    w = F.pad(valid, (0, pad)).reshape(valid.shape[0], 1, n, stride, 1)
    xs = F.pad(x, (0, 0, 0, pad)).reshape(b, h, n, stride, d)
    return (xs * w).sum(3) / w.sum(3).clamp_min(1.0)


def global_attention(q, k, mask, stride: int = 128) -> torch.Tensor:
    """softmax(pool(Q) pool(K)^T / sqrt(d)) per head: [B, H, n, n]."""
    valid = _valid_keys(mask, q.shape[2], q.device)
    qp, kp = pool_tokens(q, stride, valid), pool_tokens(k, stride, valid)
    return torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


def key_saliency(q, k, mask, tile: int = 512) -> torch.Tensor:
    """s_j = sum over heads and queries of A[h, i, j], computed over query tiles: [B, L]."""
    b, h, l, d = q.shape
    add = None if mask is None else mask.reshape(mask.shape[0], 1, 1, -1).to(q.dtype)
    total = torch.zeros(b, l, dtype=torch.float32, device=q.device)
    for i in range(0, l, tile):
        s = q[:, :, i:i + tile] @ k.transpose(-1, -2) / math.sqrt(d)
        if add is not None:
            s = s + add
        total += torch.softmax(s.float(), dim=-1).sum(dim=(1, 2))
    return total


def salient_indices(q, k, mask, top_k: int = 256, tile: int = 512) -> torch.Tensor:
    """The top_k most-attended key tokens (shared across heads): [B, k]."""
    sal = key_saliency(q, k, mask, tile)
    return sal.topk(min(top_k, sal.shape[1]), dim=-1).indices


def local_attention(q, k, mask, idx: torch.Tensor) -> torch.Tensor:
    """softmax(Q[I] K^T / sqrt(d)) per head: [B, H, k, L]."""
    b, h, l, d = q.shape
    qi = torch.gather(q, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], d))
    s = qi @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s + mask.reshape(mask.shape[0], 1, 1, -1).to(s.dtype)
    return torch.softmax(s, dim=-1)

"""Reference block-sparse attention in plain PyTorch (CPU or GPU), the ground truth for kernels.

Each head attends, per 128-token query block, only to the key blocks its BlockMask keeps. Memory
stays bounded: query blocks are processed in chunks and only their kept key blocks are gathered,
so no L x L score matrix exists.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import check_layout, inverse_permutation, temporal_permutation
from .masks import BlockMask, key_bias, masked_attention

CHUNK_ELEMENTS = 1 << 24  # score elements per chunk of query blocks (64 MiB in float32)


def _blocks(x: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """[B, L, D] -> [B, n, block, D], zero-padding the partial last block."""
    b, length, d = x.shape
    return F.pad(x, (0, 0, 0, n * block - length)).view(b, n, block, d)


def _head_attention(q, k, v, bias, index, block: int) -> torch.Tensor:
    """One head. q, k, v: [B, L, D] in the head's order; bias: [B, L] additive; index: [nq, max_k]
    kept key blocks (-1 = none). Returns [B, L, D]."""
    b, length, d = q.shape
    n = -(-length // block)
    qb, kb, vb = (_blocks(x, n, block) for x in (q, k, v))
    # Additive bias per key token: the caller's mask, -inf on padding and on unused index slots.
    tok = torch.zeros(b, n * block, dtype=q.dtype, device=q.device)
    tok[:, length:] = float("-inf")
    if bias is not None:
        tok[:, :length] += bias.to(q.dtype)
    tok = tok.view(b, n, block)
    valid = index >= 0
    safe = index.clamp_min(0).long()
    max_k = index.shape[1]
    chunk = max(1, CHUNK_ELEMENTS // (b * block * max_k * block))
    out = torch.empty(b, n, block, d, dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(d)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        idx = safe[c0:c1]
        keys = kb[:, idx].reshape(b, c1 - c0, max_k * block, d)
        vals = vb[:, idx].reshape(b, c1 - c0, max_k * block, d)
        slot = torch.where(valid[c0:c1], 0.0, float("-inf")).to(q.dtype)
        add = tok[:, idx] + slot[None, :, :, None]
        scores = (qb[:, c0:c1] @ keys.transpose(-1, -2)) * scale + add.reshape(b, c1 - c0, 1, max_k * block)
        out[:, c0:c1] = masked_attention(scores, None, vals)
    return out.reshape(b, n * block, d)[:, :length]


def block_sparse_attention(q, k, v, mask, block_mask: BlockMask, txt_len: int, grid) -> torch.Tensor:
    """Exact softmax over the kept key blocks only. q, k, v: [B, H, L, D]; mask: additive key mask
    [B, 1, L] or None. Heads of kind "temporal" are computed in temporal order and put back.
    Returns [B, L, H*D] like dense_attention. Half-precision inputs are computed in float32.
    """
    b, heads, length, d = q.shape
    check_layout(length, txt_len, grid)
    if block_mask.seq_len != length or block_mask.num_heads != heads:
        raise ValueError(f"block mask is for {block_mask.num_heads} heads x {block_mask.seq_len} tokens, "
                         f"attention has {heads} heads x {length} tokens")
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    bias = key_bias(mask, b, length)
    perm = temporal_permutation(txt_len, grid, device=q.device)
    inv = inverse_permutation(perm)
    index, _ = block_mask.to_indices()
    index = index.to(q.device)
    out = torch.empty(b, length, heads, d, dtype=dtype, device=q.device)
    for h in range(heads):
        qh, kh, vh = (x[:, h].to(dtype) for x in (q, k, v))
        bh = bias
        if block_mask.permuted(h):
            qh, kh, vh = qh[:, perm], kh[:, perm], vh[:, perm]
            bh = None if bias is None else bias[:, perm]
        oh = _head_attention(qh, kh, vh, bh, index[h], block_mask.block)
        out[:, :, h] = oh[:, inv] if block_mask.permuted(h) else oh
    return out.reshape(b, length, heads * d).to(q.dtype)

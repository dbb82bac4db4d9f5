"""PyTorch references for kernels.sparse_attention, with the kernel's plain-tensor signature.

- `sparse_attention_ref`: exact softmax over the listed key blocks only, memory-bounded (query blocks
  in chunks, only their listed key blocks gathered: no L x L matrix), the SSAR correction added in
  fp32. The CPU path behind the library's `block_sparse_attention`.
- `dense_masked_attention_f64`: the plainest possible ground truth for tests: the block mask
  expanded to a token mask, one full float64 softmax per head, permutation applied by indexing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .correction import as_correction
from .int8_attention_ref import SCALE_FLOOR, key_mean, quantize_blocks_ref

CHUNK_ELEMENTS = 1 << 24  # score elements per chunk of query blocks (64 MiB in float32)
E4M3_MAX = 448.0  # float8 e4m3fn's largest finite value: V's per-channel scale divisor ("int8-fp8")


def _blocks(x: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """[B, L, D] -> [B, n, block, D], zero-padding the partial last block."""
    b, length, d = x.shape
    return F.pad(x, (0, 0, 0, n * block - length)).view(b, n, block, d)


def _softmax_v(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v; a row whose scores are all -inf gives 0, not NaN."""
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    return (p @ v) / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def _head_attention(q, k, v, bias, index, count, block: int) -> torch.Tensor:
    """One head. q, k, v: [B, L, D] in the head's order; bias: [B|1, L] additive or None; index /
    count: [nq, max_k] listed key blocks and how many of them are used. Returns [B, L, D]."""
    b, length, d = q.shape
    n = -(-length // block)
    qb, kb, vb = (_blocks(x, n, block) for x in (q, k, v))
    # Additive bias per key token: the caller's mask, -inf on padding and on unused index slots.
    tok = torch.zeros(b, n * block, dtype=q.dtype, device=q.device)
    tok[:, length:] = float("-inf")
    if bias is not None:
        tok[:, :length] += bias.to(q.dtype)
    tok = tok.view(b, n, block)
    max_k = index.shape[1]
    valid = torch.arange(max_k, device=index.device)[None, :] < count[:, None]
    safe = torch.where(valid, index, torch.zeros_like(index)).long()
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
        out[:, c0:c1] = _softmax_v(scores, vals)
    return out.reshape(b, n * block, d)[:, :length]


def sparse_attention_ref(q, k, v, kv_index, kv_count, *, block: int = 128, key_bias=None, perm=None,
                         permuted_heads: Optional[Sequence[bool]] = None, correction=None) -> torch.Tensor:
    """kernels.sparse_attention's contract in PyTorch: q, k, v [B, H, L, D]; kv_index [H, nq, max_k] /
    kv_count [H, nq] the key blocks each query block visits (each head's own order); key_bias [B|1, L]
    additive, original order; perm [L] the temporal order for heads with permuted_heads[h]; correction
    (a [B, L, H*D] tensor or a Correction) added in fp32. Half precision is computed in fp32.
    Returns [B, L, H*D] in q's dtype."""
    b, heads, length, d = q.shape
    dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    permuted = list(permuted_heads) if permuted_heads is not None else [False] * heads
    if any(permuted) and perm is None:
        raise ValueError("permuted heads need the temporal permutation perm")
    order = perm.long().to(q.device) if perm is not None else None
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(length, device=q.device)) if order is not None else None
    out = torch.empty(b, length, heads, d, dtype=dtype, device=q.device)
    for h in range(heads):
        qh, kh, vh = (x[:, h].to(dtype) for x in (q, k, v))
        bh = key_bias
        if permuted[h]:
            qh, kh, vh = qh[:, order], kh[:, order], vh[:, order]
            bh = None if key_bias is None else key_bias[:, order]
        oh = _head_attention(qh, kh, vh, bh, kv_index[h].to(q.device), kv_count[h].to(q.device), block)
        out[:, :, h] = oh[:, inv] if permuted[h] else oh
    out = out.reshape(b, length, heads * d)
    correction = as_correction(correction)
    if correction is not None:
        out = out.float() + correction.to(out.device).materialize()
    return out.to(q.dtype)


def v_channel_scale(v: torch.Tensor) -> torch.Tensor:
    """[B, H, D] fp32 = max |v| over the tokens / 448, floored: V's float8 e4m3 scale per channel. Two
    reductions and no |v| temporary of V's size (the kernel's wrapper calls this too)."""
    amax = torch.maximum(v.amax(dim=2).float(), v.amin(dim=2).float().neg())
    return amax.clamp_min(SCALE_FLOOR) / E4M3_MAX


def quantize_v_fp8_ref(v: torch.Tensor):
    """(V / scale as float8 e4m3fn [B, H, L, D], the scale [B, H, D]), rounded to nearest even."""
    scale = v_channel_scale(v)
    return (v.float() * (1.0 / scale)[:, :, None, :]).to(torch.float8_e4m3fn), scale


def quantized_sparse_attention_ref(q, k, v, kv_index, kv_count, *, precision: str = "int8", block: int = 128,
                                   key_bias=None, perm=None, permuted_heads: Optional[Sequence[bool]] = None,
                                   correction=None) -> torch.Tensor:
    """The quantised kernel's arithmetic (kernels.sparse_attention with precision "int8" / "int8-fp8"),
    exact in float64: Q quantised per token, K minus its mean over the tokens per block of `block` keys
    in each head's own order (temporal heads: permuted; the mean shifts each score row by a constant,
    which softmax ignores), with "int8-fp8" V in e4m3 per channel; then
    exact block-sparse softmax attention of the dequantised tensors. What the kernel adds on top is the
    rounding of P (to bf16, or x 448 to e4m3) before the P.V product. Returns [B, L, H*D] in q's dtype."""
    if precision not in ("int8", "int8-fp8"):
        raise ValueError(f"precision must be 'int8' or 'int8-fp8', got {precision!r}")
    qc, qs = quantize_blocks_ref(q, 1)  # one scale per token
    qd = qc.double() * qs.double()[..., None]
    mean = key_mean(k)
    kd = torch.empty(k.shape, dtype=torch.float64, device=k.device)
    length = k.shape[2]
    for h in range(k.shape[1]):
        permuted = permuted_heads is not None and permuted_heads[h]
        order = perm.long().to(k.device) if permuted else torch.arange(length, device=k.device)
        codes, scale = quantize_blocks_ref(k[:, h:h + 1, order], block, mean[:, h:h + 1])
        kd[:, h, order] = (codes.double() * scale.double().repeat_interleave(block, -1)[..., :length, None])[:, 0]
    if precision == "int8-fp8":
        v8, vs = quantize_v_fp8_ref(v)
        vd = v8.double() * vs.double()[:, :, None, :]
    else:
        vd = v.double()
    out = sparse_attention_ref(qd, kd, vd, kv_index, kv_count, block=block,
                               key_bias=None if key_bias is None else key_bias.double(), perm=perm,
                               permuted_heads=permuted_heads, correction=correction)
    return out.to(q.dtype)


def dense_masked_attention_f64(q, k, v, keep: torch.Tensor, block: int, *, key_bias=None, perm=None,
                               permuted_heads: Optional[Sequence[bool]] = None,
                               correction=None) -> torch.Tensor:
    """float64 [B, L, H*D]. keep: [H, nq, nk] bool in each head's own order; key_bias [B|1, L] in the
    original order; heads flagged in permuted_heads are computed on x[:, perm] and put back.
    A query row with no allowed key gives 0."""
    b, heads, length, d = q.shape
    out = torch.zeros(b, length, heads, d, dtype=torch.float64)
    tok_block = torch.arange(length) // block
    for h in range(heads):
        order = perm.long().cpu() if permuted_heads is not None and permuted_heads[h] else torch.arange(length)
        qh, kh, vh = (x[:, h].double().cpu()[:, order] for x in (q, k, v))
        allowed = keep[h].cpu()[tok_block][:, tok_block]  # [L, L] token mask
        s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        if key_bias is not None:
            s = s + key_bias.double().cpu()[:, order][:, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        top = s.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        p = torch.exp(s - top)
        oh = (p @ vh) / p.sum(-1, keepdim=True).clamp_min(1e-300)
        out[:, order, h] = oh
    out = out.reshape(b, length, heads * d)
    correction = as_correction(correction)
    if correction is not None:
        out = out + correction.to("cpu").materialize().double()
    return out


__all__ = ["sparse_attention_ref", "dense_masked_attention_f64", "quantized_sparse_attention_ref",
           "quantize_v_fp8_ref", "v_channel_scale"]

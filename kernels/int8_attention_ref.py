"""PyTorch reference for kernels.int8_attention: dense attention with INT8 Q.K^T (SageAttention-style).

The arithmetic, step by step (the Triton kernel does the same, in tiles):
1. K is smoothed: its mean over the (allowed) keys of each (batch, head) is subtracted. A score row
   then changes by the constant q.mean, which softmax ignores, but K's values shrink to their spread
   around the mean, so the INT8 grid resolves them far better when K carries a large shared offset
   (DiT keys do, channel by channel).
2. Q and smoothed K are quantised to INT8, symmetric, one fp32 scale = amax / 127 per block of
   q_block (k_block) tokens of each (batch, head).
3. scores = (q8 . k8^T) * scale_q * scale_k / sqrt(D): exact int32 products (|sum| < 2^24, exact in
   fp32 too), softmax in fp32.
4. P . V with P rounded to V's dtype (the kernel's bf16 tensor-core MMA), accumulated in fp32; the
   normaliser sums the unrounded P.

The optional base-2 log-sum-exp is that of the unsmoothed scores, log2 sum 2^(s log2 e): the row's
q.mean (from the unquantised q: quantising it would add Q's rounding times K's large mean) is added
back, so two runs over disjoint key sets merge exactly, as the sparse
kernel's do (kernels/refresh_attention.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch

Q_BLOCK = 128   # query tokens per INT8 scale (SageAttention's choice); the kernel's BLOCK_M divides nothing here
K_BLOCK = 64    # key tokens per INT8 scale; the kernel's BLOCK_N must divide it
QMAX = 127.0
SCALE_FLOOR = 1e-20  # amax floor: an all-zero block gets codes 0 and a finite scale
CHUNK_ELEMENTS = 1 << 24  # score elements per chunk of query rows (64 MiB in float32)
LOG2E = 1.4426950408889634

Keep = Union[None, str, torch.Tensor]


class Int8QK(NamedTuple):
    """Q and smoothed K as INT8 codes with per-block fp32 scales, and K's subtracted mean.
    q_codes [B, H, Lq, Dc] / k_codes [B, H, Lk, Dc] int8 (Dc = D, or D zero-padded to 32 by the kernel:
    its int8 MMA needs 32 along the reduction); q_scale [B, H, ceil(Lq / q_block)] / k_scale
    [B, H, ceil(Lk / k_block)] fp32; k_mean [B, H, D] fp32; q_shift [B, H, Lq] fp32 = q . k_mean from the
    unquantised q: what smoothing took out of each score row, added back to the log-sum-exp only."""
    q_codes: torch.Tensor
    q_scale: torch.Tensor
    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    q_shift: torch.Tensor
    q_block: int
    k_block: int


def select_keys(k: torch.Tensor, v: torch.Tensor, keep: Keep) -> Tuple[torch.Tensor, torch.Tensor]:
    """k, v restricted to the allowed keys: keep None / "all" (every key) or an integer index of the
    allowed keys along L (quantsparse_core.models.attention.allowed_keys's answer)."""
    if keep is None or (isinstance(keep, str) and keep == "all"):
        return k, v
    if not isinstance(keep, torch.Tensor) or keep.ndim != 1 or keep.is_floating_point() or keep.dtype == torch.bool:
        raise ValueError("keep must be None, 'all' or a 1-D integer index of the allowed keys "
                         f"(models.attention.allowed_keys), got {keep!r:.80}")
    keep = keep.to(device=k.device, dtype=torch.long)
    return k.index_select(2, keep), v.index_select(2, keep)


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """[B, H, D] fp32 mean of k [B, H, Lk, D] over its tokens (zeros when Lk = 0): the smoothing offset.
    The kernel calls this same function, so both paths subtract the same numbers."""
    n = k.shape[2]
    if n == 0:
        return torch.zeros(k.shape[0], k.shape[1], k.shape[3], dtype=torch.float32, device=k.device)
    return k.sum(dim=2, dtype=torch.float32) / n


def quantize_blocks_ref(x: torch.Tensor, block: int, mean: Optional[torch.Tensor] = None):
    """x [B, H, L, D] (minus mean [B, H, D] if given, in fp32) -> (int8 codes [B, H, L, D], fp32 scales
    [B, H, ceil(L / block)]): symmetric, scale = max(amax, SCALE_FLOOR) / 127 per block of tokens,
    codes = round-half-even(x / scale)."""
    b, h, length, d = x.shape
    xf = x.float()
    if mean is not None:
        xf = xf - mean.float()[:, :, None, :]
    n = -(-length // block)
    padded = torch.zeros(b, h, n * block, d, dtype=torch.float32, device=x.device)
    padded[:, :, :length] = xf
    blocks = padded.view(b, h, n, block * d)
    amax = blocks.abs().amax(-1).clamp_min(SCALE_FLOOR)
    # A tensor divisor: on CUDA, torch divides by a Python number as a multiply by its reciprocal (up to
    # 1 ulp off), which moved some scales, flipped codes at rounding ties and put 17 of 8,212 rows' LSE
    # ~2e-3 off the kernel's correctly rounded scales on an H100 (2026-12-07).
    scale = amax / torch.full_like(amax, QMAX)
    codes = torch.round(blocks / scale[..., None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes.view(b, h, n * block, d)[:, :, :length], scale


def quantize_qk_ref(q: torch.Tensor, k: torch.Tensor, *, q_block: int = Q_BLOCK, k_block: int = K_BLOCK,
                    smooth: bool = True) -> Int8QK:
    """Q per q_block tokens and K (minus its mean when smooth) per k_block tokens as INT8 (Int8QK).
    k: the allowed keys only (select_keys)."""
    mean = key_mean(k) if smooth else torch.zeros(k.shape[0], k.shape[1], k.shape[3], device=k.device)
    qc, qs = quantize_blocks_ref(q, q_block)
    kc, ks = quantize_blocks_ref(k, k_block, mean)
    shift = (q.float() * mean[:, :, None, :]).sum(-1)
    return Int8QK(qc, qs, kc, ks, mean, shift, q_block, k_block)


def _expand(scale: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """[B, H, n] per-block scales -> [B, H, length] per-token."""
    return scale.repeat_interleave(block, dim=-1)[..., :length]


def int8_attention_from_codes_ref(qk: Int8QK, v: torch.Tensor, out_dtype: torch.dtype, *,
                                  return_lse: bool = False):
    """Attention of quantised Q/K codes over v [B, H, Lk, D] (the allowed keys). Returns [B, Lq, H*D] in
    out_dtype, and with return_lse the fp32 [B, H, Lq] base-2 log-sum-exp of the unsmoothed scores."""
    b, heads, lq, _ = qk.q_codes.shape
    lk, d = v.shape[2], v.shape[3]
    sm_scale = 1.0 / math.sqrt(d)
    out = torch.zeros(b, lq, heads, d, dtype=torch.float32, device=v.device)
    lse = torch.full((b, heads, lq), float("-inf"), dtype=torch.float32, device=v.device)
    if lk == 0 or lq == 0:
        return (out.reshape(b, lq, heads * d).to(out_dtype), lse) if return_lse else out.reshape(b, lq, heads * d).to(out_dtype)
    sq = _expand(qk.q_scale, qk.q_block, lq)
    sk = _expand(qk.k_scale, qk.k_block, lk)
    rows = max(1, CHUNK_ELEMENTS // lk)
    for bi in range(b):
        for h in range(heads):
            kf = qk.k_codes[bi, h, :, :d].float()
            vh = v[bi, h]
            for r0 in range(0, lq, rows):
                r1 = min(lq, r0 + rows)
                qf = qk.q_codes[bi, h, r0:r1, :d].float()
                s = (qf @ kf.T) * (sq[bi, h, r0:r1, None] * sk[bi, h][None, :]) * sm_scale
                top = s.amax(-1, keepdim=True)
                p = torch.exp(s - top)
                den = p.sum(-1, keepdim=True)
                pv = p.to(vh.dtype).float() @ vh.float()
                out[bi, r0:r1, h] = pv / den
                if return_lse:
                    shift = qk.q_shift[bi, h, r0:r1] * sm_scale
                    lse[bi, h, r0:r1] = (top[:, 0] + torch.log(den[:, 0]) + shift) * LOG2E
    res = out.reshape(b, lq, heads * d).to(out_dtype)
    return (res, lse) if return_lse else res


def int8_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Keep = None,
                       q_block: int = Q_BLOCK, k_block: int = K_BLOCK, smooth: bool = True,
                       return_lse: bool = False):
    """kernels.int8_attention's contract in PyTorch. q, k, v [B, H, L, D] (fp16/bf16/fp32); keep: None /
    "all" / an integer index of the allowed keys (others are left out; none allowed -> output 0,
    lse -inf). smooth=False skips K's mean subtraction (for comparison only). Returns [B, L, H*D] in
    q's dtype, and with return_lse the fp32 [B, H, L] base-2 log-sum-exp of the scaled scores."""
    k, v = select_keys(k, v, keep)
    qk = quantize_qk_ref(q, k, q_block=q_block, k_block=k_block, smooth=smooth)
    return int8_attention_from_codes_ref(qk, v, q.dtype, return_lse=return_lse)


def exact_attention_f64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Keep = None,
                        return_lse: bool = False):
    """float64 ground truth for tests: [B, L, H*D] (and the [B, H, L] base-2 log-sum-exp)."""
    k, v = select_keys(k, v, keep)
    b, heads, lq, d = q.shape
    qd, kd, vd = (x.double().cpu() for x in (q, k, v))
    s = qd @ kd.transpose(-1, -2) / math.sqrt(d)
    if k.shape[2] == 0:
        out = torch.zeros(b, lq, heads * d, dtype=torch.float64)
        lse = torch.full((b, heads, lq), float("-inf"), dtype=torch.float64)
    else:
        out = torch.softmax(s, -1) @ vd
        out = out.transpose(1, 2).reshape(b, lq, heads * d)
        lse = torch.logsumexp(s, -1) / math.log(2)
    return (out, lse) if return_lse else out


__all__ = ["Int8QK", "Q_BLOCK", "K_BLOCK", "select_keys", "key_mean", "quantize_blocks_ref", "quantize_qk_ref",
           "int8_attention_from_codes_ref", "int8_attention_ref", "exact_attention_f64"]

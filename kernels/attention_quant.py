"""Quantised keys and values for the attention kernels' INT8 / FP8 passes (Triton), made once per call.

- K: minus its per-(batch, head) mean (smoothing: each score row moves by a constant, which softmax
  ignores), one fp32 scale per block of BLOCK_R keys in the head's order (the attention kernel's mask
  block, so each key tile has one scale: one multiply per score, as in the bf16 kernel) =
  max(amax, floor) / 127, INT8 codes (round half even).
- V (FP8 P.V only): one fp32 scale per (batch, head, channel) = amax over the tokens / 448, and
  V / scale in float8 e4m3 stored transposed, [B, H, D, L]: Hopper's FP8 MMA needs its B operand
  contiguous along the reduction (here the keys), as Triton's own FP8 attention tutorial stores V. The
  keys' stride is rounded up to 16 (e4m3_transposed_buffer): every channel's row starts 16-byte aligned, so
  the attention kernel loads tiles as vectors, and one compiled variant serves every length.
  `_prep_kv` makes K and V together for the block-sparse kernel (heads listed, rows permuted).

The rows are written in the order the attention kernel reads them: through the temporal permutation
for permuted heads, so its key loop reads contiguous rows. Rounding to e4m3 is done by bit arithmetic
under the CPU interpreter, whose float8 cast truncates (the GPU's rounds to nearest even); both give
the values kernels/sparse_attention_ref.py's quantised reference computes with torch's cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _codes

# The literals below are int8_attention_ref's QMAX (127) and SCALE_FLOOR (1e-20), and float8 e4m3fn's
# largest finite value (448, sparse_attention_ref.v_channel_scale's divisor).


@triton.jit
def _int32_to_float(s):
    """int32 s (|s| <= 2^22: every INT8 Q.K^T sum of a head of up to 256 channels) -> fp32, exactly, without the
    conversion instruction: s added to the bits 0x4B400000 of 1.5 x 2^23 is the float 1.5 x 2^23 + s (ulp 1
    there), minus 1.5 x 2^23 (exact: both lie in [2^23, 2^24]); act_quant._quant_codes_fast's trick run backwards.
    Why: I2F issues at a quarter of the fp32 rate (the CUDA programming guide's throughput table, as recalled,
    not re-checked here), the rate of exp2, which every score also needs; an integer add and an fp32 add run at
    the full rate."""
    return (s + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _round_e4m3(x):
    """fp32 x (|x| <= 448) -> the nearest-even float8 e4m3fn value, still fp32: 3 mantissa bits for
    |x| >= 2^-6, multiples of 2^-9 below (subnormals). Exact, so a later cast cannot round again."""
    ax = tl.abs(x)
    u = ax.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000
    normal = u.to(tl.float32, bitcast=True)
    sub = ((ax * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    r = tl.where(ax >= 0.015625, normal, sub)
    return tl.where(x < 0, -r, r)


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """x as float8 e4m3fn, rounded to nearest even (EXACT: by bits first, for the interpreter)."""
    if EXACT:
        x = _round_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _store_v_e4m3(V, VS, VC, b, i, h, src, rows, ok, svb, svh, svl, svsb, svsh, sob, soh, sod,
                  HEAD_D: tl.constexpr, EXACT: tl.constexpr):
    """Rows `src` of head h's V divided by its channel scales, as e4m3 into row `rows` of VC's transposed
    [D, L] slot i."""
    d = tl.arange(0, HEAD_D)
    v = tl.load(V + b * svb + h * svh + src[:, None] * svl + d[None, :], mask=ok[:, None], other=0.0)
    vinv = tl.math.div_rn(tl.full([HEAD_D], 1.0, tl.float32), tl.load(VS + b * svsb + h * svsh + d))
    v8 = _to_e4m3(v.to(tl.float32) * vinv[None, :], EXACT)
    tl.store(VC + b * sob + i * soh + d[None, :] * sod + rows[:, None], v8, mask=ok[:, None])


@triton.jit(do_not_specialize=["L", "NH", "sksb", "sksh"])
def _prep_kv(K, V, MEAN, VS, PERM, HEADS, KC, KS, VC, L, NH,
             skb, skh, skl, svb, svh, svl, smb, smh, svsb, svsh, scb, sch, scl, sksb, sksh, sob, soh, sod,
             HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr, PERMUTED: tl.constexpr, PV8: tl.constexpr,
             EXACT: tl.constexpr):
    """Program (batch x listed head, block of BLOCK_R rows): the block's K codes and its one scale, and
    with PV8 the rows' V in e4m3 transposed; without PV8 V is copied as it is (into VC [B, n, L, D])."""
    bi = tl.program_id(0)
    b = (bi // NH).to(tl.int64)
    i = (bi % NH).to(tl.int64)
    h = tl.load(HEADS + bi % NH).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < L
    if PERMUTED:
        src = tl.load(PERM + offs, mask=ok, other=0).to(tl.int64)
    else:
        src = offs.to(tl.int64)
    d = tl.arange(0, HEAD_D)
    k = tl.load(K + b * skb + h * skh + src[:, None] * skl + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    k = tl.where(ok[:, None], k - tl.load(MEAN + b * smb + h * smh + d)[None, :], 0.0)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-20), 127.0)
    inv = tl.math.div_rn(1.0, scale)
    rows = offs.to(tl.int64)
    tl.store(KC + b * scb + i * sch + rows[:, None] * scl + d[None, :], _codes(k, scale, inv, 127.0, True),
             mask=ok[:, None])
    tl.store(KS + b * sksb + i * sksh + tl.program_id(1), scale)
    if PV8:
        _store_v_e4m3(V, VS, VC, b, i, h, src, rows, ok, svb, svh, svl, svsb, svsh, sob, soh, sod, HEAD_D, EXACT)
    else:
        v = tl.load(V + b * svb + h * svh + src[:, None] * svl + d[None, :], mask=ok[:, None], other=0.0)
        tl.store(VC + b * sob + i * soh + rows[:, None] * sod + d[None, :], v, mask=ok[:, None])


def e4m3_transposed_buffer(b: int, n: int, d: int, length: int, device) -> torch.Tensor:
    """An empty e4m3 [B, n, D, L] whose keys' stride is L rounded up to 16 (see the module's docstring)."""
    return torch.empty(b, n, d, -(-length // 16) * 16, dtype=torch.float8_e4m3fn, device=device)[..., :length]


__all__ = ["e4m3_transposed_buffer"]

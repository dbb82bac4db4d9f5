"""Dense attention with INT8 Q.K^T (Triton), SageAttention-style: smoothed K, per-block scales, bf16 P.V.

Two launches per call:
- `_quant_blocks` (twice: Q, then K minus its per-(batch, head) mean): one program per block of
  tokens, fp32 amax -> scale = amax / 127 -> round-half-even codes, written as int8 [B, H, L, Dc]
  (Dc = D, or 32 for D = 16: the int8 tensor-core MMA reduces over at least 32, so the codes are
  zero-padded) plus one fp32 scale per block.
- `_int8_attn_fwd`: flash-style online softmax, one program per (BLOCK_M query rows, batch, head):
  int8 x int8 -> int32 tl.dot, made fp32 without I2F (attention_quant._int32_to_float),
  times (scale_q of the row's block) x (scale_k of the tile's block) x log2(e) / sqrt(D) in the same
  FMA that subtracts the row's max, exp2, P rounded to V's dtype for a bf16/fp16 MMA with fp32
  accumulation. Full key tiles take an unmasked path; only the last, partial one is masked.

Allowed keys (text padding left out, models.attention.allowed_keys) are selected before quantising,
so blocked keys neither take part nor move the mean. The arithmetic, and the PyTorch reference the
kernel is tested against, are in kernels/int8_attention_ref.py. On an H100 it ran at 1.04x cuDNN bf16 at
67,576 tokens with its best tile (2026-12-06, kernel alone, with an I2F per score then) and, without the I2F,
at 1.03x at 119,056 tokens with its quantisation (2026-12-07: 298.5 ms against 306.5). P.V in float8 e4m3
was tried and removed (2026-12-07): 292.2 ms at its best tile against 303.1 for bf16 P.V at the default one,
with 3x the error: this kernel is not bound by its P.V (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .act_quant import _codes
from .attention_quant import _int32_to_float
from .int8_attention_ref import K_BLOCK, LOG2E, Q_BLOCK, QMAX, SCALE_FLOOR, Int8QK, Keep, key_mean, select_keys
from .interpreter import interpreting

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128)
MIN_CODE_D = 32  # int8 tl.dot needs K >= 32 on NVIDIA GPUs

# head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N must divide the K quantisation
# block (K_BLOCK). D = 128: the best of 36 tiles on an H100 at 67,576 tokens (benchmarks/
# int8_attention_bench.py --sweep, 2026-12-06: 90.1 ms, cuDNN bf16 93.5; 8 warps 99.3); smaller
# head dims are not tuned on a GPU.
_CONFIGS = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 4, 3)}
# Lazy rescaling of the full key tiles (as kernels/sparse_attention.py's LAZY): the row maxima move only when some
# row's grew by more than LAZY_BITS (base 2) in the tile; off until measured on a GPU (config's 5th element).
LAZY = False
LAZY_BITS = tl.constexpr(8.0)


@triton.jit
def _round_bf16(x):
    """fp32 -> nearest-even bf16 value, still fp32, by bit arithmetic: the CPU interpreter's float ->
    bf16 cast truncates (the GPU's rounds to nearest)."""
    u = x.to(tl.uint32, bitcast=True)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, ROUND: tl.constexpr):
    """fp32 x rounded to the value a cast to the target dtype gives: 0 fp32 (none), 1 bf16 (bit
    arithmetic, interpreter), 2 fp16."""
    if ROUND == 1:
        x = _round_bf16(x)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit(do_not_specialize=["L", "NH"])
def _quant_blocks(X, MEAN, C, S, SHIFT, L, NH, sxb, sxh, sxl, scb, sch, scl, ssb, ssh, smb, smh, shb, shh,
                  HEAD_D: tl.constexpr, CODE_D: tl.constexpr, BLOCK: tl.constexpr, MEAN_MODE: tl.constexpr,
                  QMAX: tl.constexpr, FLOOR: tl.constexpr):
    """Codes and scale of one block of BLOCK tokens of one (batch, head): x in fp32, scale =
    max(amax, FLOOR) / QMAX correctly rounded, codes round-half-even (act_quant's exact rounding).
    MEAN_MODE 1 (K): x - mean is quantised; 2 (Q): x is, and each row's x . mean goes to SHIFT.
    Rows past L and columns past HEAD_D are zero (not written for rows past L)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < L
    rows = offs.to(tl.int64)
    d = tl.arange(0, CODE_D)
    d_ok = d < HEAD_D
    x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxl + d[None, :], mask=ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    m = tl.load(MEAN + b * smb + h * smh + d, mask=d_ok, other=0.0)
    if MEAN_MODE == 1:
        x = tl.where(ok[:, None], x - m[None, :], 0.0)
    else:
        tl.store(SHIFT + b * shb + h * shh + rows, tl.sum(x * m[None, :], 1), mask=ok)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    scale = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)
    inv = tl.math.div_rn(1.0, scale)
    codes = _codes(x, scale, inv, QMAX, True)
    tl.store(C + b * scb + h * sch + rows[:, None] * scl + d[None, :], codes, mask=ok[:, None])
    tl.store(S + b * ssb + h * ssh + blk, scale)


@triton.jit
def _tile(acc, l_i, m_i, q, rs, k_base, v_base, ks_base, j, LK, skl, svl,
          HEAD_D: tl.constexpr, CODE_D: tl.constexpr, BLOCK_N: tl.constexpr, K_SUB: tl.constexpr,
          MASKED: tl.constexpr, IEEE: tl.constexpr, ROUND_P: tl.constexpr, ROW64: tl.constexpr,
          LAZY: tl.constexpr):
    """One key tile: online-softmax update of (acc, l_i, m_i) in base-2 units. rs: the rows'
    scale_q x log2(e) / sqrt(D); the tile's scale_k is one scalar (BLOCK_N divides the K block).
    LAZY (full tiles): m_i moves only when some row's maximum grew by more than LAZY_BITS."""
    offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, CODE_D)
    offs_d = tl.arange(0, HEAD_D)
    rows = offs_n
    if ROW64:
        rows = rows.to(tl.int64)
    if MASKED:
        n_ok = offs_n < LK
        k = tl.load(k_base + rows[:, None] * skl + offs_c[None, :], mask=n_ok[:, None], other=0)
        v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    else:
        k = tl.load(k_base + rows[:, None] * skl + offs_c[None, :])
        v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :])
    c = rs * tl.load(ks_base + j // K_SUB)
    qk = _int32_to_float(tl.dot(q, tl.trans(k), out_dtype=tl.int32))
    if MASKED:
        s = tl.where(n_ok[None, :], qk * c[:, None], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed key in the row so far
    else:  # c > 0, so max(qk) * c is the largest scaled score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        m_use = m_new
        s = qk * c[:, None]
    if LAZY and not MASKED:  # the reference maxima m_i move only when some row grew by > LAZY_BITS
        if tl.max(m_new - m_i, 0) > LAZY_BITS:  # the first tile too: m_i is -inf there
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.math.exp2(s - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    if IEEE:  # fp32 V, or the CPU interpreter: P rounded as the GPU's cast would, exact fp32 products
        acc = tl.dot(_round_to(p, ROUND_P), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


# Lengths and the strides of the per-block scales, shifts and LSE (they follow L / block) are not
# specialised on: a new resolution reuses the compiled kernel instead of recompiling mid-step. The batch
# and head strides of the codes, V and O stay specialised: they are multiples of the head dim (so always
# divisible by 16, no recompile), and without that the compiler cannot prove the tiles' rows aligned and
# loads them element by element (2026-12-06: 0.35x cuDNN at 720p with them unspecialised).
@triton.jit(do_not_specialize=["LQ", "LK", "NH", "sqsb", "sqsh", "sksb", "sksh", "shb", "shh", "slb", "slh"])
def _int8_attn_fwd(QC, QS, KC, KS, QSH, V, O, LSE,
                   sqcb, sqch, sqcl, sqsb, sqsh, skcb, skch, skcl, sksb, sksh, shb, shh,
                   svb, svh, svl, sob, sol, slb, slh, LQ, LK, NH, qk_scale,
                   HEAD_D: tl.constexpr, CODE_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   Q_BLOCK: tl.constexpr, K_SUB: tl.constexpr, IEEE: tl.constexpr, ROUND_P: tl.constexpr,
                   ROUND_O: tl.constexpr, ROW64: tl.constexpr, HAS_LSE: tl.constexpr, LAZY: tl.constexpr):
    mb = tl.program_id(0)
    bh = tl.program_id(1)  # programs of one (batch, head) run together: its K/V stay in L2
    b = (bh // NH).to(tl.int64)
    h = (bh % NH).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, CODE_D)
    offs_d = tl.arange(0, HEAD_D)
    m_ok = offs_m < LQ
    rows_m = offs_m
    if ROW64:
        rows_m = rows_m.to(tl.int64)
    q = tl.load(QC + b * sqcb + h * sqch + rows_m[:, None] * sqcl + offs_c[None, :], mask=m_ok[:, None], other=0)
    rs = tl.load(QS + b * sqsb + h * sqsh + offs_m // Q_BLOCK, mask=m_ok, other=0.0) * qk_scale

    k_base = KC + b * skcb + h * skch
    v_base = V + b * svb + h * svh
    ks_base = KS + b * sksb + h * sksh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    n_full = LK // BLOCK_N
    for j in range(0, n_full):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, rs, k_base, v_base, ks_base, j, LK, skcl, svl,
                              HEAD_D, CODE_D, BLOCK_N, K_SUB, False, IEEE, ROUND_P, ROW64, LAZY)
    for j in range(n_full, tl.cdiv(LK, BLOCK_N)):  # the partial last tile, if any
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, rs, k_base, v_base, ks_base, j, LK, skcl, svl,
                              HEAD_D, CODE_D, BLOCK_N, K_SUB, True, IEEE, ROUND_P, ROW64, LAZY)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_LSE:  # of the unsmoothed scores: add back q . mean(K), which smoothing took out of every score
        shift = tl.load(QSH + b * shb + h * shh + offs_m, mask=m_ok, other=0.0) * qk_scale
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe) + shift, float("-inf"))
        tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=m_ok)
    out = _round_to(out, ROUND_O)
    tl.store(O + b * sob + h * HEAD_D + rows_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None])


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def _check(q, k, v, q_block: int, k_block: int) -> None:
    if not (q.ndim == k.ndim == v.ndim == 4 and k.shape == v.shape and q.shape[:2] == k.shape[:2]
            and q.shape[3] == k.shape[3]):
        raise ValueError(f"q must be [B, H, Lq, D] and k, v [B, H, Lk, D] with the same B, H, D, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"head_dim {q.shape[3]} is not supported by the INT8 kernel: use one of {HEAD_DIMS} "
                         "(or the reference, QUANTSPARSE_KERNELS=torch)")
    for name, n in (("q_block", q_block), ("k_block", k_block)):
        if n < 16 or not _pow2(n):
            raise ValueError(f"{name} must be a power of two >= 16, got {n}")


def _check_config(config, k_block: int) -> tuple:
    block_m, block_n, warps, stages = config[:4]
    if block_m < 16 or block_n < 16 or not (_pow2(block_m) and _pow2(block_n)):
        raise ValueError(f"BLOCK_M and BLOCK_N must be powers of two >= 16 (the MMA's minimum), got {config}")
    if k_block % block_n:
        raise ValueError(f"BLOCK_N {block_n} must divide the K quantisation block {k_block} (one scale per tile)")
    return block_m, block_n, warps, stages


def _code_dim(d: int) -> int:
    return max(d, MIN_CODE_D)


def _quantize(x: torch.Tensor, block: int, mean: torch.Tensor, smooth: bool):
    """(codes, scales, and for Q (smooth False) each row's x . mean) of x [B, H, L, D]."""
    b, heads, length, d = x.shape
    codes = torch.empty(b, heads, length, _code_dim(d), dtype=torch.int8, device=x.device)
    n = -(-length // block)
    scale = torch.empty(b, heads, n, dtype=torch.float32, device=x.device)
    shift = None if smooth else torch.empty(b, heads, length, dtype=torch.float32, device=x.device)
    if n and b and heads:
        sh = scale if shift is None else shift
        warps = 8 if block * _code_dim(d) > 8192 else 4
        _quant_blocks[(n, b * heads)](
            x, mean, codes, scale, sh, length, heads, x.stride(0), x.stride(1), x.stride(2),
            codes.stride(0), codes.stride(1), codes.stride(2), scale.stride(0), scale.stride(1),
            mean.stride(0), mean.stride(1), sh.stride(0), sh.stride(1),
            HEAD_D=d, CODE_D=_code_dim(d), BLOCK=block, MEAN_MODE=1 if smooth else 2, QMAX=QMAX,
            FLOOR=SCALE_FLOOR, num_warps=warps)
    return codes, scale, shift


def quantize_qk(q: torch.Tensor, k: torch.Tensor, *, q_block: int = Q_BLOCK, k_block: int = K_BLOCK) -> Int8QK:
    """Q per q_block tokens and K minus its mean per k_block tokens as INT8 codes + fp32 scales
    (kernels.int8_attention_ref.Int8QK; codes zero-padded to 32 columns for D = 16). k: the allowed
    keys only. Equal to quantize_qk_ref (same mean, same rounding) up to the column padding."""
    _check(q, k, k, q_block, k_block)
    q, k = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k))
    mean = key_mean(k)
    qc, qs, shift = _quantize(q, q_block, mean, False)
    kc, ks, _ = _quantize(k, k_block, mean, True)
    return Int8QK(qc, qs, kc, ks, mean, shift, q_block, k_block)


def int8_attention_codes(qk: Int8QK, v: torch.Tensor, *, out_dtype: Optional[torch.dtype] = None,
                         out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                         config: Optional[tuple] = None) -> torch.Tensor:
    """Attention of quantised Q/K (quantize_qk) over v [B, H, Lk, D] (the allowed keys, contiguous last
    dim). Returns [B, Lq, H*D] in out_dtype (default v's), written into `out` if given; lse: an fp32
    [B, H, Lq] tensor to receive the base-2 log-sum-exp of the unsmoothed scaled scores (-inf where
    no key is allowed). config: (BLOCK_M, BLOCK_N, num_warps, num_stages[, lazy]) override, for tuning (lazy:
    lazy rescaling, default LAZY)."""
    b, heads, lq, code_d = qk.q_codes.shape
    lk, d = v.shape[2], v.shape[3]
    out_dtype = out_dtype or v.dtype
    if v.ndim != 4 or tuple(v.shape[:2]) != (b, heads) or tuple(qk.k_codes.shape[:3]) != (b, heads, lk) \
            or code_d != _code_dim(d) or qk.k_codes.shape[3] != code_d:
        raise ValueError(f"v [B, H, Lk, D] = {tuple(v.shape)} does not fit the codes: q {tuple(qk.q_codes.shape)}, "
                         f"k {tuple(qk.k_codes.shape)} (made by quantize_qk from the same keys?)")
    if v.dtype not in _FLOAT or out_dtype not in _FLOAT or d not in HEAD_DIMS:
        raise ValueError(f"v must be fp16/bf16/fp32 with head_dim in {HEAD_DIMS}, and out_dtype float; got "
                         f"{v.dtype}, head_dim {d}, out_dtype {out_dtype}")
    if v.device != qk.q_codes.device:
        raise ValueError(f"v is on {v.device}, the codes on {qk.q_codes.device}")
    if out is not None and (tuple(out.shape) != (b, lq, heads * d) or out.dtype != out_dtype
                            or out.device != v.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {out_dtype} [B, L, H*D] = {(b, lq, heads * d)} tensor on v's device "
                         "with a contiguous last dim")
    if lse is not None and (tuple(lse.shape) != (b, heads, lq) or lse.dtype != torch.float32
                            or lse.device != v.device or lse.stride(-1) != 1):
        raise ValueError(f"lse must be a float32 [B, H, L] = {(b, heads, lq)} tensor on v's device with a "
                         f"contiguous last dim, got {lse.dtype} {tuple(lse.shape)} on {lse.device}")
    v = v if v.stride(-1) == 1 else v.contiguous()
    if out is None:
        out = torch.empty(b, lq, heads * d, dtype=out_dtype, device=v.device)
    if lq == 0 or b == 0 or heads == 0:
        return out
    if lk == 0:  # no allowed key: 0, as the reference
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out
    block_m, block_n, warps, stages = _check_config(config or _CONFIGS[d], qk.k_block)
    lazy = bool(config[4]) if config is not None and len(config) > 4 else LAZY
    if v.dtype == torch.float32:  # fp32 V tiles: shared memory
        block_m, stages = min(block_m, 64), min(stages, 2)
    ieee = v.dtype == torch.float32 or interpreting()
    round_p = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[v.dtype] if ieee else 0
    round_o = 1 if out_dtype == torch.bfloat16 and interpreting() else 0
    strides = [qk.q_codes.stride(2), qk.k_codes.stride(2), v.stride(2), out.stride(1)]
    row64 = max(lq, lk) * max(strides) >= 2 ** 31
    dummy = qk.q_scale
    _int8_attn_fwd[(triton.cdiv(lq, block_m), b * heads)](
        qk.q_codes, qk.q_scale, qk.k_codes, qk.k_scale, qk.q_shift, v, out, lse if lse is not None else dummy,
        qk.q_codes.stride(0), qk.q_codes.stride(1), qk.q_codes.stride(2), qk.q_scale.stride(0), qk.q_scale.stride(1),
        qk.k_codes.stride(0), qk.k_codes.stride(1), qk.k_codes.stride(2), qk.k_scale.stride(0), qk.k_scale.stride(1),
        qk.q_shift.stride(0), qk.q_shift.stride(1), v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        lq, lk, heads, LOG2E / math.sqrt(d),
        HEAD_D=d, CODE_D=code_d, BLOCK_M=block_m, BLOCK_N=block_n, Q_BLOCK=qk.q_block, K_SUB=qk.k_block // block_n,
        IEEE=ieee, ROUND_P=round_p, ROUND_O=round_o, ROW64=row64, HAS_LSE=lse is not None, LAZY=lazy,
        num_warps=warps, num_stages=stages)
    return out


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: Keep = None,
                   q_block: int = Q_BLOCK, k_block: int = K_BLOCK, out: Optional[torch.Tensor] = None,
                   lse: Optional[torch.Tensor] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """Dense attention with INT8 Q.K^T. q, k, v [B, H, L, D] (fp16/bf16/fp32, any strides with a
    contiguous last dim, D in HEAD_DIMS); keep: None / "all" / an integer index of the allowed keys
    (models.attention.allowed_keys: text padding left out; none allowed -> 0). Returns [B, L, H*D] in
    q's dtype (into `out` if given); lse / config as int8_attention_codes."""
    _check(q, k, v, q_block, k_block)
    _check_config(config or _CONFIGS[q.shape[-1]], k_block)  # before any launch: a bad tile fails with its fix
    k, v = select_keys(k, v, keep)
    qk = quantize_qk(q, k, q_block=q_block, k_block=k_block)
    return int8_attention_codes(qk, v, out_dtype=q.dtype, out=out, lse=lse, config=config)


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel takes q's dtype and head_dim (else: the reference)."""
    return q.dtype in _FLOAT and q.ndim == 4 and q.shape[-1] in HEAD_DIMS


__all__ = ["int8_attention", "int8_attention_codes", "quantize_qk", "supports", "HEAD_DIMS"]

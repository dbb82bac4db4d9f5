"""Block-sparse attention forward (Triton): flash-style online softmax over listed key blocks only.

Each program owns one (batch, head, BLOCK_M query rows) tile and visits only the key blocks that
kv_index/kv_count list for its query block, with fp32 accumulation and exp2 (log2e folded into the
scale). Heads in temporal order read their q/k/v rows through the permutation (gather loads) and
write their output rows back through it (scatter); with KV_COPY their k/v are first gathered into a
head-ordered copy (bounded in size), so the key loop reads contiguous rows as for spatial heads. An
additive per-key bias (ComfyUI's padded-text mask, -inf allowed) and an SSAR correction
(added in the epilogue: out_sparse + C in one pass) are optional.

Programs of text query tiles (which visit every key block) are launched first, then each head's
query tiles in order, so neighbouring programs share their key window in L2.
The PyTorch references are in kernels/sparse_attention_ref.py.
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Optional, Sequence

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
import triton.language as tl

from .interpreter import interpreting
from .act_quant import _codes
from .attention_quant import _int32_to_float, _prep_kv, _round_e4m3, e4m3_transposed_buffer
from .int8_attention_ref import key_mean
from .sparse_attention_ref import v_channel_scale
from .correction import Correction, as_correction

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
MAX_CORRECTION_RANK = 128  # the epilogue's [rows, r] x [r, D] factor product holds r (padded) in registers
LOG2E = 1.4426950408889634

# H100 configs: head_dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_N divides the mask block.
# Temporal heads: read k/v from a head-ordered copy made first (bounded per launch) instead of gathering
# through the permutation in the loop. On H100 the in-loop gather makes temporal-only heads 1.33 x d x
# dense cuDNN vs 1.10 for spatial-only (benchmarks/dev_kernel_sweep.py); with the copy the whole kernel
# (half the heads temporal) runs at 1.12 / 1.11 x d x dense at 15% / 25% (benchmarks/results/, runs 5 and 10).
KV_COPY = True
KV_COPY_BYTES = 512 * 2 ** 20
# The bf16 pass's unmasked key tiles by TMA (tensor descriptors) instead of pointer loads, where the layout allows
# (Hopper+): on an H100 at 720p (119,056 tokens, 2026-12-07, benchmarks/quantized_attention_bench.py) the 15% pass
# 49.2 ms against 51.5, every key block 334.9 against 342.8, the merged refresh 339.8 against 371.2.
TMA = True
# Lazy rescaling of the bf16 pass's unmasked tiles: the row maxima the exponentials subtract move only when some
# row's maximum grew by more than LAZY_BITS (base 2) in the tile, so most tiles skip rescaling the accumulator
# (one multiply per output element and tile) at the cost of one block-wide max; P then stays below 2^LAZY_BITS,
# well inside bf16 and fp32. Off until measured on a GPU (benchmarks/quantized_attention_bench.py --sweep).
LAZY = False
LAZY_BITS = tl.constexpr(8.0)
# The quantised passes, per precision: D = 128 from a 48-tile sweep at 720p / 15% on an H100 (2026-12-06,
# benchmarks/quantized_attention_bench.py --sweep, per-key K scales then): int8 128x128 / 8 warps / 4 stages
# 64.6 ms, int8-fp8 64x128 / 4 warps / 3 stages 53.9 ms (its 128x64 / 4 warps: 105.8); other head dims untuned.
_QCONFIGS = {"int8": {32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 128, 8, 4), 256: (64, 64, 8, 2)},
             "int8-fp8": {32: (64, 64, 4, 3), 64: (64, 128, 4, 3), 128: (64, 128, 4, 3), 256: (64, 64, 8, 2)}}
PRECISIONS = ("bf16", "int8", "int8-fp8")
_CONFIGS = {16: (128, 128, 4, 3), 32: (128, 128, 4, 3), 64: (128, 128, 4, 3), 128: (128, 128, 8, 5),
            256: (64, 64, 8, 2)}


@triton.jit
def _rows(PERM, offs, ok, PERMUTED: tl.constexpr, ROW64: tl.constexpr):
    """Storage rows of sequence positions `offs`: through the temporal permutation for permuted heads
    (a gather, no permuted copy), widened to int64 when rows x stride may exceed int32."""
    if PERMUTED:
        rows = tl.load(PERM + offs, mask=ok, other=0)
    else:
        rows = offs
    if ROW64:
        rows = rows.to(tl.int64)
    return rows


@triton.jit
def _tiles(acc, l_i, m_i, q, k_base, v_base, idx_base, bias_base, PERM, j0, j1, L, skl, svl, qk_scale, ks_base, rs,
           k_desc, v_desc, krow, kcol, vrow, vcol,
           HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, PERMUTED: tl.constexpr,
           MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROW64: tl.constexpr,
           WS: tl.constexpr, KV_COPY: tl.constexpr, QK8: tl.constexpr, PV8: tl.constexpr, TMA: tl.constexpr,
           LAZY: tl.constexpr):
    """Key tiles j0 <= j < j1 of the listed blocks. MASKED: bounds check + additive bias; otherwise
    every key is valid and unbiased (the fast path). WS: Triton's automatic warp specialization.
    QK8: INT8 codes of q and of the (copied) keys, per-row scales rs / one scale per key block at ks_base.
    TMA: the fast path's K/V tiles through tensor descriptors (rows krow / vrow + key, columns kcol / vcol of
    2-D views). LAZY: lazy rescaling on the fast path (see LAZY above)."""
    if QK8:
        for j in range(j0, j1):
            acc, l_i, m_i = _tile8(acc, l_i, m_i, q, rs, k_base, v_base, ks_base, idx_base, bias_base, PERM, j, L,
                                   skl, svl, HEAD_D, BLOCK_N, SUB, PERMUTED, MASKED, HAS_BIAS, IEEE, ROW64, PV8)
    elif WS:
        for j in tl.range(j0, j1, warp_specialize=True):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, idx_base, bias_base, PERM, j, L, skl, svl,
                                  qk_scale, k_desc, v_desc, krow, kcol, vrow, vcol, HEAD_D, BLOCK_N, SUB, PERMUTED,
                                  MASKED, HAS_BIAS, IEEE, ROW64, KV_COPY, TMA, LAZY)
    else:
        for j in range(j0, j1):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_base, v_base, idx_base, bias_base, PERM, j, L, skl, svl,
                                  qk_scale, k_desc, v_desc, krow, kcol, vrow, vcol, HEAD_D, BLOCK_N, SUB, PERMUTED,
                                  MASKED, HAS_BIAS, IEEE, ROW64, KV_COPY, TMA, LAZY)
    return acc, l_i, m_i


@triton.jit
def _tile8(acc, l_i, m_i, q8, rs, k_base, v_base, ks_base, idx_base, bias_base, PERM, j, L, skl, svl,
           HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, PERMUTED: tl.constexpr,
           MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROW64: tl.constexpr,
           PV8: tl.constexpr):
    """One key tile of the quantised pass: int8 x int8 -> int32 Q.K^T, made fp32 without I2F
    (attention_quant._int32_to_float), times the rows' scale (with log2(e) / sqrt(D)) and the scale of the
    tile's key block (one per mask block: BLOCK_N divides it). k/v come from attention_quant's copy in
    this head's order.
    PV8: P x 448 (by the exponent: exp2(s - m + log2 448), so l_i and acc are in units of 448) in e4m3 times
    V^T's e4m3 tile [D, BLOCK_N] (stride svl between channels) into a fresh fp32 MMA result added to acc
    (Hopper's FP8 MMA accumulates with fewer bits: not across tiles); else P rounded to V's dtype, as the
    bf16 kernel."""
    offs_d = tl.arange(0, HEAD_D)
    kb = tl.load(idx_base + j // SUB)
    offs_n = kb * (BLOCK_N * SUB) + (j % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n
    if ROW64:
        rows = rows.to(tl.int64)
    if MASKED:
        n_ok = offs_n < L
        kc = tl.load(k_base + rows[:, None] * skl + offs_d[None, :], mask=n_ok[:, None], other=0)
        if PV8:
            v = tl.load(v_base + offs_d[:, None] * svl + rows[None, :], mask=n_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if HAS_BIAS:
            b_rows = _rows(PERM, offs_n, n_ok, PERMUTED, ROW64)  # the bias stays in the original order
            bias = tl.load(bias_base + b_rows, mask=n_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            add = tl.where(n_ok, bias, float("-inf"))
        else:
            add = tl.where(n_ok, 0.0, float("-inf"))
    else:
        kc = tl.load(k_base + rows[:, None] * skl + offs_d[None, :])
        if PV8:
            v = tl.load(v_base + offs_d[:, None] * svl + rows[None, :])
        else:
            v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :])
    c = rs * tl.load(ks_base + kb)  # > 0
    qk = _int32_to_float(tl.dot(q8, tl.trans(kc), out_dtype=tl.int32))
    if MASKED:
        s = qk * c[:, None] + add[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        if PV8:  # P x 448 for e4m3 by the exponent: exp2(s - m + log2(448))
            p = tl.math.exp2(s - (m_use - 8.807354922057604)[:, None])
        else:
            p = tl.math.exp2(s - m_use[:, None])
    else:  # c > 0, so max(qk) * c is the largest scaled score
        m_new = tl.maximum(m_i, tl.max(qk, 1) * c)
        m_use = m_new
        if PV8:
            x = qk * c[:, None] - (m_use - 8.807354922057604)[:, None]
        else:
            x = qk * c[:, None] - m_use[:, None]
        p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)  # PV8: in units of 448, as acc
    if PV8:
        if IEEE:  # the interpreter: e4m3 rounding by bits, exact fp32 products
            pv = tl.dot(_round_e4m3(p), tl.trans(v.to(tl.float32)), input_precision="ieee")
        else:
            pv = tl.dot(p.to(tl.float8e4nv), tl.trans(v))
        acc = acc * alpha[:, None] + pv
    else:
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _tile(acc, l_i, m_i, q, k_base, v_base, idx_base, bias_base, PERM, j, L, skl, svl, qk_scale,
          k_desc, v_desc, krow, kcol, vrow, vcol,
          HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr, PERMUTED: tl.constexpr,
          MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROW64: tl.constexpr,
          KV_COPY: tl.constexpr, TMA: tl.constexpr, LAZY: tl.constexpr):
    """One key tile: online-softmax update of (acc, l_i, m_i). KV_COPY: k/v are already in this head's
    order (a permuted copy), so their rows are contiguous; only the bias goes through PERM. TMA (fast
    path only, rows in order): K and V tiles by tensor-descriptor loads instead of pointer loads."""
    offs_d = tl.arange(0, HEAD_D)
    kb = tl.load(idx_base + j // SUB)
    offs_n = kb * (BLOCK_N * SUB) + (j % SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    if MASKED:
        n_ok = offs_n < L
        if KV_COPY:
            k_rows = _rows(PERM, offs_n, n_ok, False, ROW64)
        else:
            k_rows = _rows(PERM, offs_n, n_ok, PERMUTED, ROW64)
        kt = tl.load(k_base + k_rows[None, :] * skl + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        v = tl.load(v_base + k_rows[:, None] * svl + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if HAS_BIAS:
            if KV_COPY:  # the bias stays in the original order
                b_rows = _rows(PERM, offs_n, n_ok, PERMUTED, ROW64)
            else:
                b_rows = k_rows
            bias = tl.load(bias_base + b_rows, mask=n_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            add = tl.where(n_ok, bias, float("-inf"))
        else:
            add = tl.where(n_ok, 0.0, float("-inf"))
    elif TMA:
        n0 = kb * (BLOCK_N * SUB) + (j % SUB) * BLOCK_N
        kt = tl.trans(k_desc.load([krow + n0, kcol]))
        v = v_desc.load([vrow + n0, vcol])
    else:
        if PERMUTED and not KV_COPY:
            k_rows = tl.load(PERM + offs_n)
        else:
            k_rows = offs_n
        if ROW64:
            k_rows = k_rows.to(tl.int64)
        kt = tl.load(k_base + k_rows[None, :] * skl + offs_d[:, None])
        v = tl.load(v_base + k_rows[:, None] * svl + offs_d[None, :])
    if IEEE:  # fp32 inputs, or the CPU interpreter (its bf16 tl.dot is wrong): exact fp32 products
        qk = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
    else:
        qk = tl.dot(q, kt)
    if MASKED:
        qk = qk * qk_scale + add[None, :]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key so far
        p = tl.math.exp2(qk - m_use[:, None])
    else:  # all keys valid: m_new is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        if LAZY:  # the reference maxima m_i move only when some row grew by > LAZY_BITS (the first tile: m_i -inf)
            if tl.max(m_new - m_i, 0) > LAZY_BITS:
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha
                acc = acc * alpha[:, None]
                m_i = m_new
            m_use = m_i
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    if LAZY and not MASKED:  # rescaled above where it had to be
        l_i = l_i + tl.sum(p, 1)
    else:
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    if IEEE:  # p rounded to v's dtype as on the GPU path, then multiplied in fp32
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


# Integers that differ between resolutions or correction ranks are not specialised on (== 1, divisible by
# 16): a run at a new resolution then reuses the kernels compiled at another one, instead of stalling a
# step on a recompile (a 544p run on an H100 stalled ~2 s at the first reuse and the first second-order
# reuse; the likely cause, not yet confirmed on a GPU: the block-index strides, multiples of 16 at 544p
# but not in the warm-up, gave new specialisations). Strides of the q/k/v/out/correction rows, which set the main loads' alignment and are
# multiples of the head width at every resolution, stay specialised.
@triton.jit(do_not_specialize=["L", "NH", "KRB", "KRH", "KCH", "VRB", "VRH", "VCH", "BH", "T", "NM", "NB_BIAS",
                               "ssb", "sbb", "slb", "slh", "sih", "siq", "sch", "sub", "suh", "sul", "R", "sksb",
                               "sksh", "svsb", "svsh", "smb", "smh"])
def _sparse_attn_fwd(Q, K, V, O, LSE, C, CS, US, VH, BIAS, PERM, HEADS, KV_IDX, KV_CNT, KS, VS, MEAN,
                     K_DESC, V_DESC, KRB, KRH, KCH, VRB, VRH, VCH,
                     sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sksb, sksh, svsb, svsh, smb, smh,
                     sob, sol, slb, slh, scb, scl, ssb, ssl, sub, suh, sul, svhb, svhh, svhr, R, sbb, sih, siq, sch,
                     L, NH, BH, T, NM, NB_BIAS, qk_scale,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB: tl.constexpr,
                     PERMUTED: tl.constexpr, HAS_BIAS: tl.constexpr, CORR: tl.constexpr, HAS_LR: tl.constexpr,
                     R_PAD: tl.constexpr, IEEE: tl.constexpr, ROW64: tl.constexpr, WS: tl.constexpr,
                     KV_COPY: tl.constexpr, HAS_LSE: tl.constexpr, QK8: tl.constexpr, PV8: tl.constexpr,
                     TMA: tl.constexpr, LAZY: tl.constexpr):
    pid = tl.program_id(0)
    heavy = BH * T
    if pid < heavy:  # text query tiles first: they visit every key block
        bh = pid % BH
        mb = pid // BH
    else:
        r = pid - heavy
        bh = r // (NM - T)
        mb = T + r % (NM - T)
    b = (bh // NH).to(tl.int64)
    h = tl.load(HEADS + bh % NH).to(tl.int64)
    qblk = (mb * BLOCK_M) // (BLOCK_N * SUB)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    m_ok = offs_m < L
    q_rows = _rows(PERM, offs_m, m_ok, PERMUTED, ROW64)
    q = tl.load(Q + b * sqb + h * sqh + q_rows[:, None] * sql + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if QK8:  # the tile's rows quantised here, once: scale per row = amax / 127, codes round half even
        qf = q.to(tl.float32)
        sq = tl.math.div_rn(tl.maximum(tl.max(tl.abs(qf), 1), 1e-20), 127.0)
        inv = tl.math.div_rn(tl.full(sq.shape, 1.0, tl.float32), sq)
        q_in = _codes(qf, sq[:, None], inv[:, None], 127.0, True)
        rs = sq * qk_scale
        ks_base = KS + b * sksb + (bh % NH).to(tl.int64) * sksh
    else:
        q_in = q
        rs = tl.zeros([BLOCK_M], tl.float32)
        ks_base = KS

    if KV_COPY:  # the copy holds this launch's heads in order
        k_base = K + b * skb + (bh % NH).to(tl.int64) * skh
        v_base = V + b * svb + (bh % NH).to(tl.int64) * svh
    else:
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
    bias_base = BIAS + b * sbb
    # TMA's 2-D views: row of key 0 of this (batch, head), column of its channel 0 (k and v may differ)
    if KV_COPY:  # the copy holds this launch's heads in order
        hk = (bh % NH).to(tl.int64)
    else:
        hk = h
    krow = (b * KRB + hk * KRH).to(tl.int32)
    kcol = (hk * KCH).to(tl.int32)
    vrow = (b * VRB + hk * VRH).to(tl.int32)
    vcol = (hk * VCH).to(tl.int32)
    idx_base = KV_IDX + h * sih + qblk * siq
    cnt = tl.load(KV_CNT + h * sch + qblk)

    # Phases over the ascending block list: [0, ja) blocks below NB_BIAS (biased, masked),
    # [ja, jc) the fast unmasked path, [jc, end) a last block that runs past L (masked).
    ja = cnt * 0
    if HAS_BIAS:
        for jj in range(0, tl.minimum(cnt, NB_BIAS)):
            ja += (tl.load(idx_base + jj) < NB_BIAS).to(tl.int32)
    jc = cnt
    if cnt > 0:
        last = tl.load(idx_base + cnt - 1)
        if (last + 1) * (BLOCK_N * SUB) > L:
            jc = cnt - 1
    ja = tl.minimum(ja, jc)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q_in, k_base, v_base, idx_base, bias_base, PERM, 0, ja * SUB, L, skl, svl,
                           qk_scale, ks_base, rs, K_DESC, V_DESC, krow, kcol, vrow, vcol, HEAD_D, BLOCK_N, SUB,
                           PERMUTED, True, HAS_BIAS, IEEE, ROW64, WS, KV_COPY, QK8, PV8, TMA, LAZY)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q_in, k_base, v_base, idx_base, bias_base, PERM, ja * SUB, jc * SUB, L,
                           skl, svl, qk_scale, ks_base, rs, K_DESC, V_DESC, krow, kcol, vrow, vcol, HEAD_D, BLOCK_N,
                           SUB, PERMUTED, False, HAS_BIAS, IEEE, ROW64, WS, KV_COPY, QK8, PV8, TMA, LAZY)
    acc, l_i, m_i = _tiles(acc, l_i, m_i, q_in, k_base, v_base, idx_base, bias_base, PERM, jc * SUB, cnt * SUB, L,
                           skl, svl, qk_scale, ks_base, rs, K_DESC, V_DESC, krow, kcol, vrow, vcol, HEAD_D, BLOCK_N,
                           SUB, PERMUTED, True, HAS_BIAS, IEEE, ROW64, WS, KV_COPY, QK8, PV8, TMA, LAZY)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # nothing allowed -> 0, as the reference
    if PV8:  # acc and l_i are in units of 448, acc in units of V / (V's channel scale)
        out = out * tl.load(VS + b * svsb + h * svsh + offs_d)[None, :]
    if HAS_LSE:  # base-2 log-sum-exp of the row's scaled scores; -inf where nothing was allowed
        lse = tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        if PV8:
            lse = lse - 8.807354922057604
        if QK8:  # smoothing took q . mean(K) out of every score of the row: add it back
            lse = lse + tl.sum(qf * tl.load(MEAN + b * smb + h * smh + offs_d)[None, :], 1) * qk_scale
        tl.store(LSE + b * slb + h * slh + q_rows, lse, mask=m_ok)
    o_off = b * sob + h * HEAD_D + q_rows[:, None] * sol + offs_d[None, :]
    if CORR > 0:
        out = _add_correction(out, C, CS, US, VH, b, h, q_rows, m_ok, offs_d, scb, scl, ssb, ssl, sub, suh, sul,
                              svhb, svhh, svhr, R, HEAD_D, CORR, HAS_LR, R_PAD)
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None])


@triton.jit
def _add_correction(out, C, CS, US, VH, b, h, q_rows, m_ok, offs_d, scb, scl, ssb, ssl, sub, suh, sul,
                    svhb, svhh, svhr, R, HEAD_D: tl.constexpr, CORR: tl.constexpr, HAS_LR: tl.constexpr,
                    R_PAD: tl.constexpr):
    """out + C for this tile, C rebuilt from the cache's parts (kernels/correction.py):
    D dense (CORR 1) or int8 codes x row scale (CORR 2), plus us[rows, :R] @ vh[:R, :] (HAS_LR)."""
    c = tl.load(C + b * scb + h * HEAD_D + q_rows[:, None] * scl + offs_d[None, :], mask=m_ok[:, None], other=0)
    c = c.to(tl.float32)
    if CORR == 2:
        c = c * tl.load(CS + b * ssb + q_rows * ssl, mask=m_ok, other=0.0)[:, None]
    out = out + c
    if HAS_LR:
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        us = tl.load(US + b * sub + h * suh + q_rows[:, None] * sul + offs_r[None, :],
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        vh = tl.load(VH + b * svhb + h * svhh + offs_r[:, None] * svhr + offs_d[None, :],
                     mask=r_ok[:, None], other=0.0).to(tl.float32)
        out = tl.dot(us, vh, out, input_precision="ieee")
    return out


@triton.jit(do_not_specialize=["L", "NH"])
def _gather_rows(K, V, KC, VC, PERM, HEADS, L, NH, skb, skh, skl, svb, svh, svl, scb, sch, scl,
                 HEAD_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """kc[b, i, r] = k[b, heads[i], perm[r]] (and v): the temporal heads' keys/values in their own order."""
    bi = tl.program_id(0)
    b = (bi // NH).to(tl.int64)
    i = bi % NH
    h = tl.load(HEADS + i).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = offs < L
    src = tl.load(PERM + offs, mask=ok, other=0).to(tl.int64)
    d = tl.arange(0, HEAD_D)
    dst = b * scb + i.to(tl.int64) * sch + offs.to(tl.int64)[:, None] * scl + d[None, :]
    x = tl.load(K + b * skb + h * skh + src[:, None] * skl + d[None, :], mask=ok[:, None])
    tl.store(KC + dst, x, mask=ok[:, None])
    x = tl.load(V + b * svb + h * svh + src[:, None] * svl + d[None, :], mask=ok[:, None])
    tl.store(VC + dst, x, mask=ok[:, None])


def _check(q, k, v, kv_index, kv_count, block, key_bias, perm, permuted, correction, out):
    if not (q.ndim == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must all be [B, H, L, D] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == kv_index.device == kv_count.device):
        raise ValueError("q, k, v, kv_index and kv_count must be on one device")
    b, heads, length, d = q.shape
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim {d} is not supported by the Triton kernel: use a power of two in 16..256 "
                         "(or the reference, QUANTSPARSE_KERNELS=torch)")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block {block} is not supported by the Triton kernel: use a power of two >= 16")
    nq = -(-length // block)
    if kv_index.dtype != torch.int32 or kv_count.dtype != torch.int32:
        raise ValueError(f"kv_index and kv_count must be int32 (BlockMask.to_indices()), got {kv_index.dtype}, "
                         f"{kv_count.dtype}")
    if kv_index.ndim != 3 or tuple(kv_index.shape[:2]) != (heads, nq) or tuple(kv_count.shape) != (heads, nq):
        raise ValueError(f"kv_index must be [H={heads}, nq={nq}, max_k] and kv_count [{heads}, {nq}] for L={length} "
                         f"and block {block}, got {tuple(kv_index.shape)} and {tuple(kv_count.shape)}: "
                         "was the block mask built for another sequence length or head count?")
    if key_bias is not None:
        if key_bias.ndim != 2 or key_bias.shape[1] != length or key_bias.shape[0] not in (1, b):
            raise ValueError(f"key_bias must be [B or 1, L={length}], got {tuple(key_bias.shape)}")
        if key_bias.device != q.device or not key_bias.is_floating_point():
            raise ValueError("key_bias must be a floating tensor on q's device")
    if any(permuted):
        if perm is None:
            raise ValueError("permuted_heads names heads but no perm [L] was given")
        if perm.ndim != 1 or perm.numel() != length or perm.device != q.device:
            raise ValueError(f"perm must be a [L={length}] index on q's device, got {tuple(perm.shape)} on {perm.device}")
    if correction is not None:
        _check_correction(correction, q, b, length, heads, d)
    if out is not None and (tuple(out.shape) != (b, length, heads * d) or out.dtype != q.dtype
                            or out.device != q.device or out.stride(-1) != 1):
        raise ValueError(f"out must be a {q.dtype} [B, L, H*D] = {(b, length, heads * d)} tensor on q's device "
                         "with a contiguous last dim")


def _check_correction(c: Correction, q, b: int, length: int, heads: int, d: int) -> None:
    if tuple(c.shape) != (b, length, heads * d):
        raise ValueError(f"correction must be [B, L, H*D] = {(b, length, heads * d)}, got {tuple(c.shape)}")
    if c.dense is not None and c.dense.dtype not in _FLOAT:
        raise ValueError(f"a dense correction must be fp16/bf16/fp32, got {c.dense.dtype}")
    if c.codes is not None and c.scale.dtype != torch.float32:
        raise ValueError(f"int8 correction codes need an fp32 row scale, got {c.scale.dtype}")
    if c.us is not None:
        if c.vh.shape[-1] != d or c.us.shape[1] != heads:
            raise ValueError(f"correction factors must be [B, H={heads}, L, r] and [B, H, r, D={d}], "
                             f"got {tuple(c.us.shape)} and {tuple(c.vh.shape)}")
        if c.rank > MAX_CORRECTION_RANK or c.us.dtype not in _FLOAT or c.vh.dtype not in _FLOAT:
            raise ValueError(f"correction factors must be float with rank <= {MAX_CORRECTION_RANK}, "
                             f"got {c.us.dtype} / {c.vh.dtype} of rank {c.rank}")
    if any(t is not None and t.device != q.device for t in (c.dense, c.codes, c.scale, c.us, c.vh)):
        raise ValueError("correction must be on q's device")


def _correction_args(c: Optional[Correction], dummy: torch.Tensor) -> tuple:
    """The kernel's correction pointers, strides and flags (CORR 0 none / 1 dense / 2 int8; HAS_LR; R_PAD)."""
    if c is None:
        return (dummy,) * 4 + (0,) * 11, dict(CORR=0, HAS_LR=False, R_PAD=16)
    lead = c.dense if c.dense is not None else c.codes
    scale = c.scale.reshape(c.scale.shape[0], c.scale.shape[1]) if c.scale is not None else dummy
    args = [lead, scale, c.us if c.us is not None else dummy, c.vh if c.vh is not None else dummy,
            lead.stride(0), lead.stride(1)]
    args += [scale.stride(0), scale.stride(1)] if c.scale is not None else [0, 0]
    args += [c.us.stride(0), c.us.stride(1), c.us.stride(2)] if c.us is not None else [0, 0, 0]
    args += [c.vh.stride(0), c.vh.stride(1), c.vh.stride(2), c.rank] if c.vh is not None else [0, 0, 0, 0]
    r_pad = max(16, triton.next_power_of_2(max(c.rank, 1)))
    return tuple(args), dict(CORR=1 if c.dense is not None else 2, HAS_LR=c.us is not None, R_PAD=r_pad)


def _contiguous_last(c: Optional[Correction]) -> Optional[Correction]:
    if c is None:
        return None
    fix = (lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous())  # noqa: E731
    return Correction(fix(c.dense), fix(c.codes), fix(c.scale), fix(c.us), fix(c.vh))


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor,
                     kv_count: torch.Tensor, *, block: int = 128, key_bias: Optional[torch.Tensor] = None,
                     perm: Optional[torch.Tensor] = None, permuted_heads: Optional[Sequence[bool]] = None,
                     correction=None, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                     config: Optional[tuple] = None, precision: str = "bf16",
                     heavy_rows: Optional[int] = None) -> torch.Tensor:
    """Block-sparse attention. q, k, v: [B, H, L, D] (any strides with a contiguous last dim);
    kv_index [H, nq, max_k] int32 / kv_count [H, nq] int32 list the key blocks (in each head's own
    order) that each query block visits; key_bias [B|1, L] additive, original order; perm [L]: the
    temporal order (x[perm] is x permuted) used by heads with permuted_heads[h] true; correction
    (a [B, L, H*D] tensor or a kernels.correction.Correction) added to the output.
    Returns [B, L, H*D] in q's dtype (written into `out` if given). lse: an fp32 [B, H, L] tensor
    (contiguous last dim) to receive each row's base-2 log-sum-exp of its scaled scores
    log2(sum 2^(s * log2 e)), s = q.k / sqrt(D) + bias, over the keys it visits (-inf if none), in
    the original token order: two runs over disjoint key sets merge exactly (kernels/refresh_attention.py).
    config: (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize[, kv_copy[, tma[, lazy]]]]) override,
    for tuning; tma: the bf16 pass's unmasked key tiles by tensor-descriptor (TMA) loads where the layout
    allows (Hopper+, default TMA); lazy: the bf16 pass's lazy rescaling (default LAZY). kv_copy (default KV_COPY): temporal heads read k/v from a permuted copy made
    per group of heads (at most KV_COPY_BYTES), not through the permutation inside the loop (which makes them 21%
    slower than spatial heads on H100).
    precision: "bf16" (scores and P.V in the inputs' precision), "int8" (Q.K^T from INT8 codes: Q per
    row, K minus its mean per mask block; P.V as bf16) or "int8-fp8" (also P.V in float8 e4m3: P x 448, V per
    channel); the arithmetic is kernels/sparse_attention_ref.py's quantized_sparse_attention_ref. The
    quantised passes need head_dim >= 32 (the INT8 MMA's reduction).
    heavy_rows: rows of the leading query blocks to schedule first (they visit the most key blocks); None reads
    them from kv_count (once per count tensor: a host sync). Scheduling only: any value gives the same output.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    heads = q.shape[1] if q.ndim == 4 else 0
    permuted = [bool(x) for x in (permuted_heads if permuted_heads is not None else [False] * heads)]
    if len(permuted) != heads:
        raise ValueError(f"permuted_heads must give one flag per head ({heads}), got {len(permuted)}")
    correction = as_correction(correction)
    _check(q, k, v, kv_index, kv_count, block, key_bias, perm, permuted, correction, out)
    b, heads, length, d = q.shape
    if lse is not None and (tuple(lse.shape) != (b, heads, length) or lse.dtype != torch.float32
                            or lse.device != q.device or lse.stride(-1) != 1):
        raise ValueError(f"lse must be a float32 [B, H, L] = {(b, heads, length)} tensor on q's device with a "
                         f"contiguous last dim, got {lse.dtype} {tuple(lse.shape)} on {lse.device}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if out is None:
        out = torch.empty(b, length, heads * d, dtype=q.dtype, device=q.device)
    if length == 0 or b == 0:
        return out
    kv_index = kv_index.contiguous()
    kv_count = kv_count.contiguous()
    quant = precision != "bf16"
    if quant and not _quant_ok(q, block, precision):
        raise ValueError(f"precision {precision!r} needs head_dim >= 32 (the INT8 MMA reduces over 32), got {d}"
                         + ("" if precision != "int8-fp8" else ", a mask block >= 32 (the FP8 MMA's reduction) and "
                            "a GPU with float8 (compute capability 8.9+)") + ": use precision 'bf16' or 'int8'")
    block_m, block_n, warps, stages, *rest = config or (_QCONFIGS[precision] if quant else _CONFIGS)[d]
    ws = bool(rest and rest[0]) and not interpreting()
    kv_copy = bool(rest[1]) if len(rest) > 1 else KV_COPY
    tma = bool(rest[2]) if len(rest) > 2 else (TMA and not interpreting())
    lazy = bool(rest[3]) if len(rest) > 3 else LAZY
    block_n = min(block, block_n)
    block_m = min(block_m, block)
    if q.dtype == torch.float32:
        block_m, block_n, stages = min(block_m, 64), min(block_n, 64), min(stages, 2)  # fp32 tiles: shared memory
    sub = block // block_n
    nm = -(-length // block_m)
    if key_bias is not None:
        key_bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
        sbb = 0 if key_bias.shape[0] == 1 else key_bias.stride(0)
    else:
        sbb = 0
    correction = _contiguous_last(correction)
    if any(permuted):
        perm = perm.to(torch.int32).contiguous()
    nb_bias = _bias_blocks(key_bias, perm if any(permuted) else None, block)
    strides = [x.stride(2) for x in (q, k, v)] + [out.stride(1)] + ([lse.stride(1)] if lse is not None else [])
    if correction is not None:
        strides += [t.stride(-2) for t in (correction.dense, correction.codes, correction.scale, correction.us)
                    if t is not None and t.ndim >= 2]
    row64 = length * max(strides) >= 2 ** 31
    dummy = kv_count
    corr_args, corr_flags = _correction_args(correction, dummy)
    scale = LOG2E / math.sqrt(d)
    pv8 = precision == "int8-fp8"
    q_args = (dummy, dummy, dummy, 0, 0, 0, 0, 0, 0)
    if quant:
        mean = key_mean(k)
        vscale = v_channel_scale(v) if pv8 else mean
    for flag in (True, False):
        heads_all = [h for h in range(heads) if permuted[h] == flag]
        if not heads_all:
            continue
        copy = quant or (flag and kv_copy)
        per_head = b * length * (2 * d * k.element_size() if not quant else d * (2 if pv8 else 1 + v.element_size()) + 1)
        group = max(1, KV_COPY_BYTES // per_head) if copy else len(heads_all)
        rows = _text_rows(kv_count, heads_all, block) if heavy_rows is None else max(0, int(heavy_rows))
        t = min(-(-rows // block_m), nm)
        for g0 in range(0, len(heads_all), group):
            heads_list = heads_all[g0:g0 + group]
            hl = _head_list(tuple(heads_list), q.device)
            bh = b * len(heads_list)
            kk, vv = k, v
            if quant:
                kk, vv, q_args = _quantized_copy(k, v, mean, vscale, perm if flag else None, hl, len(heads_list),
                                                 pv8, block)
            elif copy:
                kk = torch.empty(b, len(heads_list), length, d, dtype=k.dtype, device=k.device)
                vv = torch.empty_like(kk)
                _gather_rows[(bh, triton.cdiv(length, 64))](
                    k, v, kk, vv, perm, hl, length, len(heads_list), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
                    HEAD_D=d, BLOCK_R=64)
            descs = _kv_descriptors(kk, vv, block_n) if tma and not quant and (copy or not flag) else None
            _sparse_attn_fwd[(bh * nm,)](
                q, kk, vv, out, lse if lse is not None else dummy, *corr_args[:4],
                key_bias if key_bias is not None else dummy, perm if flag else dummy, hl, kv_index, kv_count,
                *q_args[:3], *(descs or (dummy, dummy, 0, 0, 0, 0, 0, 0)),
                q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
                vv.stride(0), vv.stride(1), vv.stride(2), *q_args[3:], out.stride(0), out.stride(1),
                lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0, *corr_args[4:],
                sbb, kv_index.stride(0), kv_index.stride(1), kv_count.stride(0),
                length, len(heads_list), bh, t, nm, nb_bias[flag], scale,
                HEAD_D=d, BLOCK_M=block_m, BLOCK_N=block_n, SUB=sub, PERMUTED=flag,
                HAS_BIAS=key_bias is not None, **corr_flags,
                IEEE=q.dtype == torch.float32 or interpreting(),
                ROW64=row64, WS=ws and not quant, KV_COPY=copy, HAS_LSE=lse is not None, QK8=quant, PV8=pv8,
                TMA=descs is not None, LAZY=lazy and not quant, num_warps=warps, num_stages=stages)
    return out


def _rows_view(t: torch.Tensor):
    """(2-D view [rows, cols] of t [B, H, L, D], rows per batch, rows per head, columns per head) such that
    t[b, h, l] is the view's row b * RB + h * RH + l from column h * CH; None for other layouts. Two layouts:
    heads interleaved in each token's row ([B, L, H, D] transposed, as ComfyUI's q/k/v) and head-major
    contiguous (the kernel's own copies)."""
    b, heads, length, d = t.shape
    sb, sh, sl, sd = t.stride()
    if sd != 1:
        return None
    # each view holds exactly t's elements, so it stays inside t's storage
    if sh == d and (b == 1 or sb == length * sl) and sl >= heads * d:
        return t.as_strided((b * length, heads * d), (sl, 1)), length, 0, d
    if sl == d and (heads == 1 or sh == length * d) and (b == 1 or sb == heads * length * d):
        return t.as_strided((b * heads * length, d), (d, 1)), heads * length, length, 0
    return None


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """(K descriptor, V descriptor, K's RB, RH, CH, V's RB, RH, CH) for the kernel's TMA loads of [block_n, D] key
    tiles (k and v may be laid out differently: the single blocks' new k beside v, a view of linear1's output), or
    None where a layout breaks TMA's rules (16-byte aligned base and row stride, 2-byte floats; Hopper or newer,
    or the interpreter)."""
    if k.dtype not in (torch.float16, torch.bfloat16) or v.dtype != k.dtype:
        return None
    if not interpreting() and not (k.is_cuda and torch.cuda.get_device_capability(k.device) >= (9, 0)):
        return None
    kv = _rows_view(k)
    vv = _rows_view(v)
    if kv is None or vv is None:
        return None
    if any(x[0].data_ptr() % 16 or (x[0].stride(0) * x[0].element_size()) % 16 for x in (kv, vv)):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    d = k.shape[-1]
    return (TensorDescriptor.from_tensor(kv[0], [block_n, d]), TensorDescriptor.from_tensor(vv[0], [block_n, d]),
            *kv[1:], *vv[1:])


def _quantized_copy(k, v, mean, vscale, perm, heads: torch.Tensor, n: int, pv8: bool, block: int):
    """The listed heads' keys as INT8 codes [B, n, L, D] + a scale per block of `block` keys [B, n, nb], and V as e4m3
    transposed [B, n, D, L] (pv8) or copied [B, n, L, D], rows in each head's order
    (attention_quant._prep_kv); with the kernel's extra pointers and strides."""
    b, _, length, d = k.shape
    kc = torch.empty(b, n, length, d, dtype=torch.int8, device=k.device)
    nb = -(-length // block)
    ks = torch.empty(b, n, nb, dtype=torch.float32, device=k.device)
    if pv8:
        vc = e4m3_transposed_buffer(b, n, d, length, k.device)
    else:
        vc = torch.empty(b, n, length, d, dtype=v.dtype, device=k.device)
    sod = vc.stride(2)
    _prep_kv[(b * n, nb)](
        k, v, mean, vscale, perm if perm is not None else heads, heads, kc, ks, vc, length, n,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), mean.stride(0), mean.stride(1),
        vscale.stride(0), vscale.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1),
        vc.stride(0), vc.stride(1), sod,
        HEAD_D=d, BLOCK_R=block, PERMUTED=perm is not None, PV8=pv8, EXACT=interpreting(),
        num_warps=8 if block * d >= 8192 else 4)
    return kc, vc, (ks, vscale, mean, ks.stride(0), ks.stride(1), vscale.stride(0), vscale.stride(1),
                    mean.stride(0), mean.stride(1))


@functools.lru_cache(maxsize=256)
def _head_list(heads: tuple, device: torch.device) -> torch.Tensor:
    """The launch's head indices as an int32 tensor on `device`, made once: torch.tensor(list,
    device=cuda) copies from pageable memory and syncs the host with the GPU queue on every call."""
    return torch.tensor(heads, dtype=torch.int32, device=device)


def _bias_blocks(key_bias, perm, block: int) -> dict:
    """{permuted?: number of leading key blocks (in that order) holding a nonzero bias}. Keys past
    them take the kernel's unmasked fast path. ComfyUI's mask covers padded text only. Reading it
    syncs the host (nonzero, max), so the answer is kept for the last mask seen: every layer of a
    step passes a view of the same mask tensor (a weak reference checks it is the same, unmodified one)."""
    if key_bias is None:
        return {False: 0, True: 0}
    root = key_bias._base if key_bias._base is not None else key_bias
    key = (key_bias.data_ptr(), tuple(key_bias.shape), key_bias.stride(), tensor_version(root), block,
           None if perm is None else tensor_version(perm))
    cached = getattr(_bias_blocks, "cache", None)
    if cached is not None and cached[0] == key and cached[1]() is root and (
            perm is None or cached[2]() is perm):
        return dict(cached[3])
    nz = (key_bias != 0).any(0)
    res = {}
    for flag in (False, True):
        x = nz if not flag or perm is None else nz[perm.long()]
        pos = torch.nonzero(x)
        res[flag] = 0 if pos.numel() == 0 else int(pos.max()) // block + 1
    _bias_blocks.cache = (key, weakref.ref(root), weakref.ref(perm) if perm is not None else None, dict(res))
    return res


def _text_rows(kv_count: torch.Tensor, heads: list, block: int) -> int:
    """Rows of the leading query blocks that visit the most key blocks (the text rows), scheduled first.
    Read on the host from the counts of the first head (0 when no leading block is heavier), once per count
    tensor: a mask's indices live as long as the mask, so every reuse step between two refreshes launches
    each layer without reading device memory, i.e. without waiting for the GPU (the earlier one-entry cache
    missed at every layer: one host read per layer and step)."""
    key = (tensor_version(kv_count), heads[0], block)
    known = _TEXT_ROWS.get(kv_count)
    if known is not None and key in known:
        return known[key]
    c = kv_count[heads[0]].tolist()
    n = 0
    while n < len(c) and c[n] == max(c) and max(c) > min(c):
        n += 1
    if known is None:
        known = _TEXT_ROWS[kv_count] = {}
    known[key] = n * block
    return n * block


# kv_count tensor -> {(its version, first head, block): text rows}; entries go with their tensors
_TEXT_ROWS = WeakIdKeyDictionary()


def tensor_version(t: torch.Tensor) -> int:
    """In-place modification counter; inference tensors (ComfyUI runs nodes under
    torch.inference_mode) have none and cannot be modified outside inference mode, so -1."""
    return -1 if t.is_inference() else t._version


def supports(q: torch.Tensor, block: int, precision: str = "bf16") -> bool:
    """Whether the kernel takes q's dtype / head_dim and this mask block in this precision (else: the
    reference)."""
    d = q.shape[-1]
    ok = q.dtype in _FLOAT and 16 <= d <= 256 and not d & (d - 1) and block >= 16 and not block & (block - 1)
    return ok and (precision == "bf16" or (precision in PRECISIONS and _quant_ok(q, block, precision)))


def _quant_ok(q: torch.Tensor, block: int, precision: str) -> bool:
    """Whether a quantised precision compiles for these inputs: the INT8 MMA reduces over >= 32 (head_dim),
    the FP8 one too (P.V over the key tile: mask block >= 32), and float8 exists from compute capability 8.9."""
    if q.shape[-1] < 32:
        return False
    if precision != "int8-fp8":
        return True
    if block < 32:
        return False
    return q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) >= (8, 9)


__all__ = ["sparse_attention", "supports", "PRECISIONS", "tensor_version", "MAX_CORRECTION_RANK"]

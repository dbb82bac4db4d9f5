"""Fused per-token dynamic activation quantization (Triton).

Loads each row (bf16/fp16/fp32), multiplies by the inverse smoothing factors, takes the absmax,
forms scale = max(clip * absmax, 1e-8) / qmax and writes int8 codes + the fp32 scale. The result
(fp32, correctly rounded x / scale, round-half-to-even) equals QuantLinear's real mode bit for bit.
Default "rows" kernel: several rows per program, one read for K <= 4096, and the codes without a
division per element (_quant_codes_fast); the older one-row kernels stay for comparison.

Rotation: when Kronecker factors are given the rotation runs as two batched torch matmuls in fp32
(after the smoothing), then this kernel quantizes without smoothing (documented fallback; the
rotation is not fused).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
AUTO_VARIANT = "rows"  # fastest on H100 at K = 3072 / 12288 / 15360 (benchmarks/dev_kernel_sweep.py)


@triton.jit
def _quant_codes(x, scale, QMAX: tl.constexpr):
    """fp32 x / scale (IEEE) rounded half to even and clamped, exactly like torch.round + clamp."""
    y = tl.math.div_rn(x, tl.zeros_like(x) + scale)
    # |y| <= qmax / clip is small, so y + 0.5 is exact in fp32 and ties are detected exactly.
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    r = tl.where(tie & odd, r - 1.0, r)
    return tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)


@triton.jit
def _act_quant_chunked_kernel(x_ptr, s_ptr, q_ptr, scale_ptr, clip, K, stride_x, stride_q,
                              QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, CHUNK: tl.constexpr):
    """Two passes over the row in CHUNK pieces: absmax, then codes. The second read hits L2 (the
    row was just read), so DRAM traffic stays one read + one write, with no padding of K to 2^n."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, CHUNK)
    xrow = x_ptr + row * stride_x
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for k in range(0, K, CHUNK):
        m = offs < K - k
        x = tl.load(xrow + k + offs, mask=m, other=0.0, eviction_policy="evict_last").to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(s_ptr + k + offs, mask=m, other=0.0)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) * clip, 1e-8) / QMAX
    for k in range(0, K, CHUNK):
        m = offs < K - k
        x = tl.load(xrow + k + offs, mask=m, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(s_ptr + k + offs, mask=m, other=0.0)
        tl.store(q_ptr + row * stride_q + k + offs, _quant_codes(x, scale, QMAX), mask=m)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _act_quant_kernel(x_ptr, s_ptr, q_ptr, scale_ptr, clip, K, stride_x, stride_q,
                      QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(s_ptr + offs, mask=mask, other=0.0)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(amax * clip, 1e-8) / QMAX
    tl.store(q_ptr + row * stride_q + offs, _quant_codes(x, scale, QMAX), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _quant_codes_fast(x, scale, inv, QMAX: tl.constexpr):
    """The codes of _quant_codes in ~1/3 of the instructions (the chunked kernels were compute-bound).
    x / scale correctly rounded without a division (Markstein): with inv = RN(1/scale) and
    y0 = RN(x * inv) (within 1 ulp), e = x - y0 * scale is exact in an fma and RN(y0 + e * inv) =
    RN(x / scale). Clamping before rounding gives the same integers (the bounds are integers);
    adding 1.5 * 2^23 rounds |y| < 2^22 half to even in fp32 (1 ulp = 1 there) and leaves the integer
    in the low mantissa bits: bits - bits(1.5 * 2^23) is it, read with integer ops instead of a
    float -> int conversion (a quarter-rate instruction)."""
    y0 = x * inv
    e = tl.fma(-y0, scale, x)
    y = tl.fma(e, inv, y0)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    return ((y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _codes(x, scale, inv, QMAX: tl.constexpr, FAST: tl.constexpr):
    """_quant_codes_fast (FAST) or the IEEE-division _quant_codes: the same integers."""
    if FAST:
        codes = _quant_codes_fast(x, scale, inv, QMAX)
    else:
        codes = _quant_codes(x, scale, QMAX)
    return codes


@triton.jit
def _scale_inv(amax, clip, QMAX: tl.constexpr):
    """Per-row scale max(clip * absmax, 1e-8) / qmax (QuantLinear's real mode) and its correctly
    rounded reciprocal for _quant_codes_fast."""
    scale = tl.maximum(amax * clip, 1e-8) / QMAX
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _smoothed_chunk(xp, s_ptr, k, offs, K, r_ok, HAS_SMOOTH: tl.constexpr, EVICT: tl.constexpr):
    """Columns [k, k + CHUNK) of ROWS rows as fp32, times the inverse smoothing; and their mask."""
    c_ok = offs < K - k
    m = r_ok[:, None] & c_ok[None, :]
    x = tl.load(xp + k, mask=m, other=0.0, eviction_policy=EVICT).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(s_ptr + k + offs, mask=c_ok, other=0.0)[None, :]
    return x, m


@triton.jit
def _act_quant_rows_kernel(x_ptr, s_ptr, q_ptr, scale_ptr, clip, M, K, stride_x, stride_q,
                           QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROWS: tl.constexpr,
                           CHUNK: tl.constexpr, CHUNK2: tl.constexpr, ONEPASS: tl.constexpr,
                           FAST: tl.constexpr):
    """ROWS rows per program as a [ROWS, CHUNK] tile, absmax reduced per row. ONEPASS (CHUNK + CHUNK2
    >= K): the rows stay in registers between the absmax and the codes (one read); a second tile of
    CHUNK2 columns (0: none) avoids padding K to a power of two (3072 = 2048 + 1024). Otherwise two
    passes over CHUNK pieces, the second from L2. FAST: _quant_codes_fast instead of _quant_codes."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    rows = rows.to(tl.int64)
    offs = tl.arange(0, CHUNK)
    xp = x_ptr + rows[:, None] * stride_x + offs[None, :]
    qp = q_ptr + rows[:, None] * stride_q + offs[None, :]
    if ONEPASS:
        x, m = _smoothed_chunk(xp, s_ptr, 0, offs, K, r_ok, HAS_SMOOTH, "evict_first")
        amax = tl.max(tl.abs(x), axis=1)
        if CHUNK2 > 0:
            offs2 = CHUNK + tl.arange(0, CHUNK2)
            c2_ok = offs2 < K
            m2 = r_ok[:, None] & c2_ok[None, :]
            x2 = tl.load(x_ptr + rows[:, None] * stride_x + offs2[None, :], mask=m2, other=0.0,
                         eviction_policy="evict_first").to(tl.float32)
            if HAS_SMOOTH:
                x2 = x2 * tl.load(s_ptr + offs2, mask=c2_ok, other=0.0)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(x2), axis=1))
        scale, inv = _scale_inv(amax, clip, QMAX)
        codes = _codes(x, scale[:, None], inv[:, None], QMAX, FAST)
        tl.store(qp, codes, mask=m)
        if CHUNK2 > 0:
            codes2 = _codes(x2, scale[:, None], inv[:, None], QMAX, FAST)
            tl.store(q_ptr + rows[:, None] * stride_q + offs2[None, :], codes2, mask=m2)
    else:
        amax = tl.zeros((ROWS, CHUNK), dtype=tl.float32)
        for k in range(0, K, CHUNK):
            x, m = _smoothed_chunk(xp, s_ptr, k, offs, K, r_ok, HAS_SMOOTH, "evict_last")
            amax = tl.maximum(amax, tl.abs(x))
        scale, inv = _scale_inv(tl.max(amax, axis=1), clip, QMAX)
        for k in range(0, K, CHUNK):
            x, m = _smoothed_chunk(xp, s_ptr, k, offs, K, r_ok, HAS_SMOOTH, "evict_first")
            codes = _codes(x, scale[:, None], inv[:, None], QMAX, FAST)
            tl.store(qp + k, codes, mask=m)
    tl.store(scale_ptr + rows, scale, mask=r_ok)


def merged_config(defaults: dict, config: dict | None, name: str) -> dict:
    """A kernel's launch defaults overridden by a tuning `config`; unknown keys are refused by name,
    None values keep the default."""
    unknown = set(config or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {name} config keys {sorted(unknown)}; use {sorted(defaults)}")
    return {**defaults, **{k: v for k, v in (config or {}).items() if v is not None}}


def _rows_config(K: int) -> dict:
    """Default launch of the rows kernel (sweeps of benchmarks/dev_kernel_sweep.py, M = 119,056):
    one pass with the rows in registers up to K = 4096 (H100, K = 3072: 1.21x the copy floor; was
    1.55x), else two passes over 4096-column pieces, one row per program with 4 warps (H200, 2026-12-01:
    K = 12288 1.07x, 15360 1.11x, against 1.24x / 1.22x for 2 rows with 8 warps, the H100's pick;
    persistent programs walking the row tiles measured 1.17-1.29x and were dropped). SPLIT (two
    unpadded tiles, 3072 = 2048 + 1024) measured slower at K = 3072 (1.17x vs 1.09x in the same
    sweep), so it stays off."""
    block = max(16, triton.next_power_of_2(K))
    if block <= 4096:
        rows = max(1, min(4, 4096 // block))
        return dict(ROWS=rows, CHUNK=block, num_warps=4, SPLIT=False)
    return dict(ROWS=1, CHUNK=4096, num_warps=4, SPLIT=False)


def _split(K: int) -> tuple:
    """(CHUNK, CHUNK2): the largest power of two <= K and the power of two covering the rest (0 if none)."""
    c = 1 << (K.bit_length() - 1)
    rest = K - c
    return (c, 0) if rest == 0 else (c, max(16, triton.next_power_of_2(rest)))


def _chunk(K: int) -> int:
    """Largest power of two dividing K, at most 2048 (0 if below 256: then the one-pass kernel)."""
    c = K & -K
    c = min(c, 2048)
    return c if c >= 256 else 0


def act_quant(x: torch.Tensor, bits: int = 8, inv_smooth: torch.Tensor | None = None,
              clip: torch.Tensor | float = 1.0, r1: torch.Tensor | None = None,
              r2: torch.Tensor | None = None, variant: str = "auto", config: dict | None = None):
    """Per-token quantization of x [..., K] -> (codes int8 [M, K], scale fp32 [M, 1]), M = prod(...).

    inv_smooth: fp32 [K] = exp(-log_smooth), multiplied in before the absmax. clip: scalar factor on
    the absmax (python float or 0-d tensor). r1, r2: Kronecker rotation factors (n1 * n2 = K).
    variant: "auto" (= "rows"), "rows" (several rows per program; by default one pass for K <= 4096,
    two above), or the older "chunked" / "onepass" (one row per program), kept for comparison.
    config (tuning, "rows" only): overrides of ROWS, CHUNK (a power of two; >= K means one pass), num_warps, FAST, SPLIT
    (one pass as two power-of-two tiles instead of one padded tile).
    """
    if bits not in (6, 8):
        raise ValueError(f"act_quant supports 6 or 8 activation bits, got {bits}")
    if x.dtype not in _FLOAT:
        raise ValueError(f"act_quant needs a float input (fp32/fp16/bf16), got {x.dtype}")
    K = x.shape[-1]
    if inv_smooth is not None and inv_smooth.shape != (K,):
        raise ValueError(f"inv_smooth must have shape ({K},) to match x's last dim, got {tuple(inv_smooth.shape)}")
    if (r1 is None) != (r2 is None):
        raise ValueError("give both rotation factors r1 and r2, or neither")
    x2 = x.reshape(-1, K)
    if r1 is not None:
        if r1.shape[0] * r2.shape[0] != K:
            raise ValueError(f"rotation factors {tuple(r1.shape)} x {tuple(r2.shape)} do not multiply to K={K}")
        xt = x2.float()
        if inv_smooth is not None:
            xt = xt * inv_smooth.float()
        n1, n2 = r1.shape[0], r2.shape[0]
        x2 = torch.matmul(torch.matmul(r1.float().t(), xt.reshape(-1, n1, n2)), r2.float()).reshape(-1, K)
        inv_smooth = None
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    codes = torch.empty((M, K), dtype=torch.int8, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M == 0:
        return codes, scale
    clip_f = float(clip)
    s = inv_smooth.float().contiguous() if inv_smooth is not None else scale  # dummy pointer when unused
    common = dict(QMAX=2 ** (bits - 1) - 1, HAS_SMOOTH=inv_smooth is not None)
    if variant not in ("auto", "rows", "onepass", "chunked"):
        raise ValueError(f"variant must be 'auto', 'rows', 'onepass' or 'chunked', got {variant!r}")
    if config is not None and variant not in ("auto", "rows"):
        raise ValueError(f"config applies to the 'rows' variant only, got variant={variant!r}")
    if variant == "auto":
        variant = AUTO_VARIANT
    if variant == "rows":
        cfg = merged_config(dict(_rows_config(K), FAST=True), config, "act_quant")
        rows, chunk, chunk2 = cfg["ROWS"], cfg["CHUNK"], 0
        if rows < 1 or rows & (rows - 1) or chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"ROWS and CHUNK must be powers of two (CHUNK >= 16), got {rows}, {chunk}")
        if cfg["SPLIT"] and K >= 16 and chunk >= K:  # one pass without padding K to a power of two
            chunk, chunk2 = _split(K)
        _act_quant_rows_kernel[(triton.cdiv(M, rows),)](
            x2, s, codes, scale, clip_f, M, K, x2.stride(0), codes.stride(0), ROWS=rows, CHUNK=chunk,
            CHUNK2=chunk2, ONEPASS=chunk + chunk2 >= K, FAST=bool(cfg["FAST"]), num_warps=cfg["num_warps"],
            **common)
    elif variant == "chunked":
        chunk = _chunk(K) or min(1024, triton.next_power_of_2(K))
        _act_quant_chunked_kernel[(M,)](x2, s, codes, scale, clip_f, K, x2.stride(0), codes.stride(0),
                                        CHUNK=chunk, num_warps=4 if chunk <= 1024 else 8, **common)
    else:
        block = triton.next_power_of_2(K)
        warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        _act_quant_kernel[(M,)](x2, s, codes, scale, clip_f, K, x2.stride(0), codes.stride(0),
                                BLOCK_K=block, num_warps=warps, **common)
    return codes, scale

"""Fused per-token dynamic activation quantization (Triton): one pass over each token's row.

Loads the row once (bf16/fp16/fp32), multiplies by the inverse smoothing factors, takes the absmax,
forms scale = max(clip * absmax, 1e-8) / qmax and writes int8 codes + the fp32 scale. The
arithmetic (fp32, IEEE division, round-half-to-even) equals QuantLinear's real mode bit for bit.

Rotation: when Kronecker factors are given the rotation runs as two batched torch matmuls in fp32
(after the smoothing), then this kernel quantizes without smoothing (documented fallback; the
rotation is not fused).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant_ref import EPS

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
AUTO_VARIANT = "chunked"  # faster on H100 at K = 3072 / 12288 / 15360 (benchmarks/dev_quant_kernels.py)


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


def _chunk(K: int) -> int:
    """Largest power of two dividing K, at most 2048 (0 if below 256: then the one-pass kernel)."""
    c = K & -K
    c = min(c, 2048)
    return c if c >= 256 else 0


def act_quant(x: torch.Tensor, bits: int = 8, inv_smooth: torch.Tensor | None = None,
              clip: torch.Tensor | float = 1.0, r1: torch.Tensor | None = None,
              r2: torch.Tensor | None = None, variant: str = "auto"):
    """Per-token quantization of x [..., K] -> (codes int8 [M, K], scale fp32 [M, 1]), M = prod(...).

    inv_smooth: fp32 [K] = exp(-log_smooth), multiplied in before the absmax. clip: scalar factor on
    the absmax (python float or 0-d tensor). r1, r2: Kronecker rotation factors (n1 * n2 = K).
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
    if variant not in ("auto", "onepass", "chunked"):
        raise ValueError(f"variant must be 'auto', 'onepass' or 'chunked', got {variant!r}")
    chunk = _chunk(K)
    if variant == "auto":
        variant = AUTO_VARIANT if chunk else "onepass"
    if variant == "chunked":
        chunk = chunk or min(1024, triton.next_power_of_2(K))
        _act_quant_chunked_kernel[(M,)](x2, s, codes, scale, clip_f, K, x2.stride(0), codes.stride(0),
                                        CHUNK=chunk, num_warps=4 if chunk <= 1024 else 8, **common)
    else:
        block = triton.next_power_of_2(K)
        warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        _act_quant_kernel[(M,)](x2, s, codes, scale, clip_f, K, x2.stride(0), codes.stride(0),
                                BLOCK_K=block, num_warps=warps, **common)
    return codes, scale

"""Per-head Gram matrices X^T X of a residual [B, L, H*D] (Triton), for SSAR's rank-r truncation.

SSAR's second-order refresh needs, per layer, the 24 head Gram matrices of D2 [L, 24 x 128] (fp32).
Done in float64 with torch, each head's strided slice is first copied to a float64 [L, 128] matrix:
2.9 GB written and read back per 720p layer. Here one program reads CHUNK rows of one head in place, splits them
into bf16 high and low parts (x = hi + lo to 2^-17 relative) and multiplies on the tensor cores:
X^T X = hi^T hi + hi^T lo + (hi^T lo)^T, lo^T lo (~2^-18 |x|^2) left out, fp32 accumulation. Two
bf16 MMAs per tile: a transposed bf16 operand is native to Hopper's MMA, which tf32 is not (a tf32x3
version measured 3.07 ms). H200, one 720p layer: 0.91 ms against 3.51 ms for the float64 torch path,
1.5e-5 relative error (benchmarks/dev_kernel_sweep.py --parts gram). The fp32 partials (94 MB at
720p) are summed in float64. The input is read once. Needs bf16 MMAs: sm_80 or newer.
Reference: gram_ref.head_gram_ref.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .producer_quant import _round_to_model_dtype


CHUNK = 4096      # rows per program: 30 x 24 programs at 720p; fp32 partial sums of 4,096 products
BLOCK_L = 64      # rows per MMA step; CHUNK must be a multiple (a chunk's last step must not reach into the next)


@triton.jit(do_not_specialize=["L"])  # one compile for every resolution
def _gram_partial_kernel(x_ptr, out_ptr, L, H, stride_b, stride_l, CHUNK: tl.constexpr, D: tl.constexpr,
                         BLOCK_L: tl.constexpr, INTERP: tl.constexpr):
    """Program (row chunk c, head h, batch b): hi^T hi and hi^T lo over the chunk's rows, fp32.
    INTERP (the CPU interpreter, whose dot does not take bf16 operands): the same split rounding the
    fp32 bit patterns to bf16 (nearest even), multiplied as fp32 (8-bit mantissa products are exact)."""
    c, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = tl.arange(0, D)
    base = x_ptr + b.to(tl.int64) * stride_b + h * D + cols[None, :]
    acc_hh = tl.zeros((D, D), dtype=tl.float32)
    acc_hl = tl.zeros((D, D), dtype=tl.float32)
    start = c * CHUNK
    for l0 in range(start, tl.minimum(start + CHUNK, L), BLOCK_L):
        rows = l0 + tl.arange(0, BLOCK_L)
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_l, mask=(rows < L)[:, None], other=0.0)
        if INTERP:
            hi = _round_to_model_dtype(x, 1)          # to bf16 by bit arithmetic, kept in fp32
            lo = _round_to_model_dtype(x - hi, 1)
            acc_hh = tl.dot(tl.trans(hi), hi, acc_hh, input_precision="ieee")
            acc_hl = tl.dot(tl.trans(hi), lo, acc_hl, input_precision="ieee")
        else:
            hi = x.to(tl.bfloat16)
            lo = (x - hi.to(tl.float32)).to(tl.bfloat16)
            hi_t = tl.trans(hi)
            acc_hh = tl.dot(hi_t, hi, acc_hh)
            acc_hl = tl.dot(hi_t, lo, acc_hl)
    n_chunks = tl.num_programs(0)
    out = out_ptr + ((b.to(tl.int64) * H + h) * n_chunks + c) * (2 * D * D) + cols[:, None] * D + cols[None, :]
    tl.store(out, acc_hh)
    tl.store(out + D * D, acc_hl)


def supports(x: torch.Tensor, heads: int) -> bool:
    """fp32 [B, L, H*D] with unit column stride, a power-of-two head_dim in [16, 128], and on CUDA a GPU
    with bf16 MMAs (sm_80+; older ones keep the float64 torch path)."""
    if x.dim() != 3 or x.dtype != torch.float32 or x.stride(-1) != 1 or heads < 1 or x.shape[-1] % heads:
        return False
    if x.shape[0] > 65535 or heads > 65535:  # grid dimensions
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    d = x.shape[-1] // heads
    return 16 <= d <= 128 and d & (d - 1) == 0


def head_gram(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x [B, L, H*D] fp32 -> float64 [B, H, D, D]: X^T X of each head's L x D slice."""
    if not supports(x, heads):
        raise ValueError(f"head_gram needs fp32 [B, L, H*D] with unit column stride, a power-of-two head_dim in "
                         f"[16, 128] and (on CUDA) an sm_80+ GPU; got {x.dtype} {tuple(x.shape)} strides {x.stride()} "
                         f"with {heads} heads")
    if CHUNK % BLOCK_L:
        raise ValueError(f"kernels.gram.CHUNK ({CHUNK}) must be a multiple of BLOCK_L ({BLOCK_L})")
    b, length, hidden = x.shape
    d = hidden // heads
    n_chunks = max(1, triton.cdiv(length, CHUNK))
    if length == 0 or b == 0:
        return torch.zeros((b, heads, d, d), dtype=torch.float64, device=x.device)
    part = torch.empty((b, heads, n_chunks, 2, d, d), dtype=torch.float32, device=x.device)
    _gram_partial_kernel[(n_chunks, heads, b)](x, part, length, heads, x.stride(0), x.stride(1), CHUNK=CHUNK, D=d,
                                               BLOCK_L=BLOCK_L, INTERP=interpreting(), num_warps=8 if d >= 128 else 4,
                                               num_stages=3)
    sums = part.double().sum(dim=2)                  # [B, H, 2, D, D]
    hl = sums[:, :, 1]
    return sums[:, :, 0] + hl + hl.transpose(-1, -2)


__all__ = ["head_gram", "supports", "CHUNK", "BLOCK_L"]

"""An SSAR refresh's residual and its drift in one pass (Triton).

A second-order refresh needs D = O_full - O_sparse (kept in the cache, bf16 in the GPU and host
placements) and D2 = D - D_prev (fp32, for the rank-r truncation). In PyTorch that is an fp32 copy
of O_full, a subtraction, an fp32 copy of D_prev, a negation, an addition and a bf16 copy for the
cache: about 10 GB of memory traffic per layer at 544p x 129 frames (computed from the tensor sizes).
Here one pass reads O_full, O_sparse and D_prev and writes D (already in the cache's dtype) and D2:
about 2.5 GB. The arithmetic
is the reference's (kernels/residual_ref.py): fp32 differences, D rounded once when stored (to nearest
even: under the CPU interpreter, whose bf16 cast truncates, by bits first).

The gpu-int8 placement (what `auto` picks at 720p on an 80 GB card) keeps D as int8 codes with one absmax
scale per token row. There the refresh was an fp32 copy and subtraction, a dequantisation of D_prev, the
drift, and then abs / amax / divide / round / clamp / int8 copy in PyTorch: in a 25-s 720p refresh step on
an H100 those kinds of kernel hold 0.87 s of the profile's top 20 (comfy_product --profile-steps, 2026-12-08). `int8_residuals` does it in one pass
per row (the row's absmax needs the whole row: one program holds it), with the reference's arithmetic bit
for bit: scale = absmax x fp32(1/127) (a product, as PyTorch's CUDA division by a scalar computes it), codes by
IEEE division and round half to even, clamped to +-127, and D2 = D - codes_prev * scale_prev without fused
multiply-adds. A row holding a NaN gets a NaN scale, as in the reference (its codes are not defined).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .int8_attention import _round_to
from .interpreter import interpreting

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 2048


@triton.jit(do_not_specialize=["N"])
def _residuals(F, S, P, D, D2, N, HAS_PREV: tl.constexpr, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d = tl.load(F + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(S + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(D + offs, _round_to(d, ROUND).to(D.dtype.element_ty), mask=ok)
    if HAS_PREV:
        tl.store(D2 + offs, d - tl.load(P + offs, mask=ok, other=0.0).to(tl.float32), mask=ok)


def supports(full: torch.Tensor, sparse: torch.Tensor, prev: Optional[torch.Tensor]) -> bool:
    """Same shape, float dtypes, contiguous (the kernel reads them as flat arrays)."""
    ts = [t for t in (full, sparse, prev) if t is not None]
    return all(t.dtype in _FLOAT and t.shape == full.shape and t.is_contiguous() and t.device == full.device
               for t in ts)


def refresh_residuals(full: torch.Tensor, sparse: torch.Tensor, prev: Optional[torch.Tensor],
                      out_dtype: torch.dtype = torch.bfloat16) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(D in out_dtype, D2 = D - prev in fp32 or None): kernels/residual_ref.py's contract, one pass."""
    ts = [t for t in (full, sparse, prev) if t is not None]
    if any(t.shape != full.shape or t.device != full.device for t in ts):
        raise ValueError(f"full, sparse (and prev) must have one shape on one device, got "
                         f"{[(tuple(t.shape), str(t.device)) for t in ts]}")
    if not supports(full, sparse, prev) or out_dtype not in _FLOAT:
        raise ValueError(f"full, sparse (and prev) must be contiguous fp16/bf16/fp32 tensors and out_dtype one of "
                         f"those; got {[t.dtype for t in ts]}, contiguous {[t.is_contiguous() for t in ts]}, "
                         f"out_dtype {out_dtype}")
    d = torch.empty(full.shape, dtype=out_dtype, device=full.device)
    d2 = None if prev is None else torch.empty(full.shape, dtype=torch.float32, device=full.device)
    n = full.numel()
    if n:
        _residuals[(triton.cdiv(n, BLOCK),)](full, sparse, prev if prev is not None else full, d,
                                            d2 if d2 is not None else d, n, HAS_PREV=prev is not None,
                                            ROUND=1 if out_dtype == torch.bfloat16 and interpreting() else 0,
                                            BLOCK=BLOCK, num_warps=8)
    return d, d2


MAX_ROW = 16384  # widest row (H*D) one program of int8_residuals holds in registers
_TINY = torch.finfo(torch.float32).tiny
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + M) - M rounds y to an integer, half to even, for |y| < 2**22


@triton.jit  # W specialised (divisible by 16: vector loads and stores); BLOCK_W compiles per width anyway
def _int8_residuals(F, S, PC, PS, C, SC, D2, W, TINY, INV127, HAS_S: tl.constexpr, HAS_PREV: tl.constexpr,
                    BLOCK_W: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)
    ok = cols < W
    base = row * W
    d = tl.load(F + base + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_S:
        d = d - tl.load(S + base + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(d), axis=0), TINY) * INV127
    nan = tl.sum((d != d).to(tl.int32), axis=0) > 0   # tl.max skips NaN: a row holding one gets a NaN scale,
    scale = tl.where(nan, float("nan"), scale)        # as the reference's amax gives, so it shows downstream
    y = tl.math.div_rn(d, scale)
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC   # |y| <= 127 here
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    tl.store(C + base + cols, y.to(tl.int8), mask=ok)
    tl.store(SC + row, scale)
    if HAS_PREV:
        prev = tl.load(PC + base + cols, mask=ok, other=0).to(tl.float32) * tl.load(PS + row)
        tl.store(D2 + base + cols, d - prev, mask=ok)


def supports_int8(x: torch.Tensor, sparse: Optional[torch.Tensor] = None,
                  prev_codes: Optional[torch.Tensor] = None) -> bool:
    """Contiguous float rows (int8 codes for prev) of one shape on one device, at most MAX_ROW wide."""
    ok = x.dtype in _FLOAT and x.is_contiguous() and x.ndim >= 1 and 0 < x.shape[-1] <= MAX_ROW
    if sparse is not None:
        ok = ok and sparse.dtype in _FLOAT and sparse.shape == x.shape and sparse.is_contiguous() \
            and sparse.device == x.device
    if prev_codes is not None:
        ok = ok and prev_codes.dtype == torch.int8 and prev_codes.shape == x.shape and prev_codes.is_contiguous() \
            and prev_codes.device == x.device
    return bool(ok)


def int8_residuals(x: torch.Tensor, sparse: Optional[torch.Tensor] = None, prev_codes: Optional[torch.Tensor] = None,
                   prev_scale: Optional[torch.Tensor] = None):
    """(codes int8, scale fp32 [..., 1], D2 fp32 or None) of D = x - sparse (x alone without sparse), as
    kernels/residual_ref.py's int8_residuals_ref: the gpu-int8 cache entry of D, and D's drift from the
    previous entry (prev_codes, prev_scale) when given."""
    if not supports_int8(x, sparse, prev_codes) or (prev_codes is None) != (prev_scale is None):
        raise ValueError(f"int8_residuals takes contiguous float rows at most {MAX_ROW} wide (sparse of the same "
                         f"shape, prev_codes int8 of the same shape with its prev_scale), got {x.dtype} "
                         f"{tuple(x.shape)}" + ("" if sparse is None else f", sparse {sparse.dtype} {tuple(sparse.shape)}")
                         + ("" if prev_codes is None else f", prev_codes {prev_codes.dtype} {tuple(prev_codes.shape)}"))
    w = x.shape[-1]
    rows = x.numel() // w
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32, device=x.device)
    d2 = None if prev_codes is None else torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if prev_scale is not None:
        prev_scale = prev_scale.to(torch.float32).contiguous()
        if prev_scale.numel() != rows:
            raise ValueError(f"prev_scale must hold one scale per row ({rows}), got {tuple(prev_scale.shape)}")
    if rows:
        block_w = triton.next_power_of_2(w)
        _int8_residuals[(rows,)](x, sparse if sparse is not None else x, prev_codes if prev_codes is not None else codes,
                                 prev_scale if prev_scale is not None else scale, codes, scale,
                                 d2 if d2 is not None else scale, w, _TINY, 1.0 / 127.0, HAS_S=sparse is not None,
                                 HAS_PREV=prev_codes is not None, BLOCK_W=block_w,
                                 num_warps=8 if block_w >= 4096 else 4, **_exact())
    return codes, scale, d2


def _exact() -> dict:
    """Launch options that keep a * b - c two roundings (no FMA contraction) on the GPU; the interpreter has none."""
    return {} if interpreting() else {"enable_fp_fusion": False}


__all__ = ["refresh_residuals", "supports", "int8_residuals", "supports_int8", "MAX_ROW"]

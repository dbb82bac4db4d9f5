"""An SSAR refresh's residual and its drift in one pass (Triton).

A second-order refresh needs D = O_full - O_sparse (kept in the cache, bf16 in the GPU and host
placements) and D2 = D - D_prev (fp32, for the rank-r truncation). In PyTorch that is an fp32 copy
of O_full, a subtraction, an fp32 copy of D_prev, a negation, an addition and a bf16 copy for the
cache: about 10 GB of memory traffic per layer at 544p x 129 frames (computed from the tensor sizes).
Here one pass reads O_full, O_sparse and D_prev and writes D (already in the cache's dtype) and D2:
about 2.5 GB. The arithmetic
is the reference's (kernels/residual_ref.py): fp32 differences, D rounded once when stored (to nearest
even: under the CPU interpreter, whose bf16 cast truncates, by bits first).
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


__all__ = ["refresh_residuals", "supports"]

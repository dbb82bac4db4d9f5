"""PyTorch references for kernels.int_gemm: exact integer products, then the fp32 scale epilogue.

y[m, n] = (sum_k a[m, k] * w[n, k]) * sa[m] * sw[n] + bias[n], with the integer sum done in int64
(exact) or in float64 (also exact at these sizes), so the kernel's int32 accumulation is checked
against a value that has no rounding of its own before the epilogue.
"""
from __future__ import annotations

import torch

from .int4 import unpack_int4


def weight_codes(w: torch.Tensor, w_bits: int) -> torch.Tensor:
    """int8 codes [N, K] from QuantLinear storage (int4 packed two per byte as in int4.pack_int4)."""
    return unpack_int4(w) if w_bits == 4 else w


def int_gemm_ref(a: torch.Tensor, sa: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, w_bits: int,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                 lora: tuple | None = None) -> torch.Tensor:
    """a int8 [M, K], sa [M, 1], w storage codes [N, K] (or packed [N, K/2] for 4 bits), sw [N, 1];
    lora (h [M, R], up [N, R]): + h @ up^T, in float64 like the rest."""
    codes = weight_codes(w, w_bits)
    if a.device.type == "cpu":
        acc = (a.to(torch.int64) @ codes.to(torch.int64).t()).double()
    else:  # integer matmul is CPU-only in torch; float64 sums of int8 products are exact here
        acc = a.double() @ codes.double().t()
    y = acc * sa.double().reshape(-1, 1) * sw.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    if lora is not None:
        y = y + lora[0].double() @ lora[1].double().t()
    return y.to(out_dtype)

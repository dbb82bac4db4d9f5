"""A low-rank side path beside a quantized linear (a LoRA on a compressed model): y += (x down^T) up^T.

QuantLinear adds the up projection inside its GEMM's epilogue (kernels.int_gemm's `lora`); this module makes
h = x down^T from whichever input the layer gets:
- the float activation: one GEMM;
- a producer's int8 codes (QuantizedInput, the fused blocks' norm / GELU groups that quantize for the layer):
  down, with the layer's smoothing folded in, is quantized per row to int8 once and runs as an int8 GEMM on
  the codes, so the producer's fused quantization stays and no float copy of the activation is made. The
  LoRA then sees the activation as the quantized layer does (clipped, rounded), as it would if it were merged
  into the weights before compression: within the quantization error of the float path
  (tests/test_kernel_lora_epilogue.py). Off the kernel path the same math runs in PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .linear import _KERNEL_DTYPES, SIDE_RANK_MULTIPLE, QuantizedInput
from .quantizers import quantize_per_token


class LowRank:
    """down [R, in], up [out, R] of one layer (R padded with zero rows / columns to SIDE_RANK_MULTIPLE, which
    add exactly nothing), in the dtype and on the device the layer runs in."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor):
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise ValueError(f"a low-rank side path needs down [R, in] and up [out, R], got {tuple(down.shape)} "
                             f"and {tuple(up.shape)}")
        pad = -down.shape[0] % SIDE_RANK_MULTIPLE
        self.down, self.up = F.pad(down, (0, 0, 0, pad)), F.pad(up, (0, pad))
        self._int8 = None   # [device, int8 codes [R, in], fp32 scale [R, 1], kernel layout or None]

    def project(self, x, layer) -> tuple:
        """(h = x down^T [..., R], up) for QuantLinear's `side`; x float, or a QuantizedInput for `layer`."""
        if isinstance(x, QuantizedInput):
            return self._from_codes(x, layer), self.up
        return F.linear(x, self.down.to(x.dtype)), self.up

    def _int8_down(self, layer, device):
        """down diag(smooth) (the codes are of x / smooth) as per-row int8 codes + scales, made once (a
        LowRank serves one layer, on the device its side paths were joined for)."""
        if self._int8 is None or self._int8[0] != device:
            d = self.down.to(device, torch.float32)
            smooth = getattr(layer, "log_smooth", None)
            if smooth is not None:
                d = d * torch.exp(smooth.detach().float().to(device))
            self._int8 = [device, *quantize_per_token(d, 8), None]
        return self._int8

    def _from_codes(self, q: QuantizedInput, layer) -> torch.Tensor:
        entry = self._int8_down(layer, q.codes.device)
        kernels = dispatch.quantized_linear_kernels(q.codes.device) if q.dtype in _KERNEL_DTYPES else None
        if kernels is None:   # the same integer math in PyTorch
            return ((q.codes.float() @ entry[1].float().t()) * q.scale * entry[2].t()).to(q.dtype)
        gemm = kernels[1]
        if entry[3] is None:
            entry[3] = gemm.prepare_weight(entry[1], 8, entry[2])
        return gemm.int_gemm(q.codes, q.scale, entry[3], out_dtype=q.dtype)

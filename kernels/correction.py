"""SSAR's correction C = D + U S V^T in the form the cache keeps it.

A reuse step adds C to the sparse attention output. Materialising C as an fp32 [B, L, H*D] tensor
(dequantising the int8 D, expanding the rank-r factors, adding, then reading it back in the kernel's
epilogue) moved ~9 GB per 720p layer: about 4 ms of a 56 ms reuse call on an H100. Handed over in
parts, the sparse kernel rebuilds each tile of C in its epilogue from the int8 codes, the row scales
and the factors (a [rows, r] x [r, D] product), and the reference materialises it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Correction:
    """D as `dense` [B, L, H*D] (any float) or as int8 `codes` [B, L, H*D] with fp32 row `scale`
    [B, L] (D = codes * scale); optionally the second-order term from factors `us` [B, H, L, r] and
    `vh` [B, H, r, D]."""
    dense: Optional[torch.Tensor] = None
    codes: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    us: Optional[torch.Tensor] = None
    vh: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.dense is None) == (self.codes is None):
            raise ValueError("a Correction holds D either dense or as int8 codes (exactly one of them)")
        if self.codes is not None:
            if self.codes.dtype != torch.int8 or self.scale is None:
                raise ValueError("int8 codes need their fp32 row scale")
            if self.scale.shape[:2] != self.codes.shape[:2] or self.scale.numel() != self.codes[..., 0].numel():
                raise ValueError(f"scale {tuple(self.scale.shape)} does not match codes {tuple(self.codes.shape)}")
        if (self.us is None) != (self.vh is None):
            raise ValueError("the factors us and vh come together")
        if self.us is not None:
            b, length, hidden = self.shape
            heads, r, d = self.vh.shape[1], self.vh.shape[2], self.vh.shape[3]
            if self.us.shape != (b, heads, length, r) or self.vh.shape != (b, heads, r, d) or heads * d != hidden:
                raise ValueError(f"factors us {tuple(self.us.shape)} / vh {tuple(self.vh.shape)} do not fit "
                                 f"D of shape {(b, length, hidden)}")

    @property
    def shape(self) -> torch.Size:
        return (self.dense if self.dense is not None else self.codes).shape

    @property
    def device(self) -> torch.device:
        return (self.dense if self.dense is not None else self.codes).device

    @property
    def rank(self) -> int:
        return 0 if self.us is None else self.us.shape[-1]

    def to(self, device) -> "Correction":
        """The parts on `device`; asynchronous only towards a CUDA device (stream-ordered there)."""
        device = torch.device(device)
        move = (lambda t: None if t is None else t.to(device, non_blocking=device.type == "cuda"))  # noqa: E731
        return Correction(move(self.dense), move(self.codes), move(self.scale), move(self.us), move(self.vh))

    def materialize(self) -> torch.Tensor:
        """C as fp32 [B, L, H*D]: the reference the kernel's epilogue is checked against."""
        if self.dense is not None:
            c = self.dense.to(torch.float32, copy=True)
        else:
            c = self.codes.float() * self.scale.float().reshape(*self.scale.shape[:2], 1)
        if self.us is not None:
            b, heads, length, _ = self.us.shape
            c += (self.us.float() @ self.vh.float()).transpose(1, 2).reshape(b, length, -1)
        return c


def as_correction(c) -> Optional[Correction]:
    """None, a Correction, or a plain [B, L, H*D] tensor (taken as dense D) -> Optional[Correction]."""
    if c is None or isinstance(c, Correction):
        return c
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"a correction is a Correction or a [B, L, H*D] tensor, got {type(c).__name__}")
    return Correction(dense=c)


__all__ = ["Correction", "as_correction"]

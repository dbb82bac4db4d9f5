"""The one place attention happens, and what it is told about the call.

Every attention in the DiT goes through `model.attention_fn(q, k, v, mask, call)`. Quantization
and sparsity plug in by replacing that function; the model itself never changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StepInfo:
    """Where sampling stands: step `index` of the schedule `sigmas` (len = steps + 1)."""
    index: int
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class AttentionCall:
    """Which attention is being computed.

    block_type: "refiner" (text token refiner), "double" or "single".
    txt_len: text tokens at the start of the joint sequence ([text, video] order).
    grid: video token grid (frames, rows, columns) after patchify.
    step: the sampling step, or None outside a sampler.
    """
    block_type: str
    block_index: int
    num_blocks: int
    txt_len: int
    grid: tuple
    step: Optional[StepInfo] = None

    @property
    def video_len(self) -> int:
        t, h, w = self.grid
        return t * h * w


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], AttentionCall], torch.Tensor]


def dense_attention(q, k, v, mask, call: AttentionCall) -> torch.Tensor:
    """Exact softmax attention. q, k, v: [B, H, L, D]; mask additive, broadcastable to [B, H, L, L].

    Returns [B, L, H*D], the layout the blocks' output projections expect.
    """
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, h, l, d = out.shape
    return out.transpose(1, 2).reshape(b, l, h * d)

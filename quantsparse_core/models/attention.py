"""The one place attention happens, and what it is told about the call.

Every attention in the DiT goes through `model.attention_fn(q, k, v, mask, call)`. Quantization
and sparsity plug in by replacing that function; the model itself never changes.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
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
    dense: the host's own dense attention for this call, (q, k, v, mask) -> [B, L, H*D] (ComfyUI: the
        attention it is configured with), which SparseSettings.host_attention uses for the dense passes;
        keyword-only, left out of equality.
    """
    block_type: str
    block_index: int
    num_blocks: int
    txt_len: int
    grid: tuple
    step: Optional[StepInfo] = None
    dense: Optional[Callable] = field(default=None, kw_only=True, compare=False, repr=False)

    @property
    def video_len(self) -> int:
        t, h, w = self.grid
        return t * h * w


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], AttentionCall], torch.Tensor]


# A key's additive mask value at or below this blocks it exactly: exp(score - 1e4) is 0 in float32 for
# any score a DiT produces, so attention with the key removed gives the same output. Text padding is
# masked with -1e4 (models.hunyuan_video.TEXT_MASK_FLOOR) or -finfo.max (ComfyUI's HunyuanVideo).
BLOCKED = -1.0e4

_keys_memo: dict = {}   # {"mask": weakref to the last mask seen, "keep": its answer}


def allowed_keys(mask: Optional[torch.Tensor]):
    """For an additive key-only mask (broadcast over queries and heads, one row for every batch entry)
    whose entries are 0 (allowed) or <= BLOCKED: "all" when every key is allowed, else the int64 indices
    of the allowed keys on the mask's device. None for any other mask (query-dependent, soft biases,
    rows differing per batch entry): the caller keeps the mask.

    One host sync per mask tensor: a model call hands every block the same mask object, so the answer
    is kept for that object (a weak reference: a new tensor at a reused address is not mistaken for it)."""
    if mask is None or mask.dim() < 2 or any(n != 1 for n in mask.shape[1:-1]) or not mask.is_floating_point():
        return None
    version = -1 if mask.is_inference() else mask._version  # inference tensors have no version counter
    memo = _keys_memo.get("mask")
    if memo is not None and memo() is mask and _keys_memo["version"] == version:
        return _keys_memo["keep"]
    rows = mask.reshape(mask.shape[0], mask.shape[-1])
    first = rows[:1]
    simple = ((first == 0) | (first <= BLOCKED)).all() & (rows == first).all()
    flags = torch.cat((simple.view(1), (first[0] == 0))).cpu()
    keep = None
    if bool(flags[0]):
        allowed = flags[1:]
        keep = "all" if bool(allowed.all()) else allowed.nonzero().flatten().to(mask.device, non_blocking=True)
    try:
        _keys_memo["mask"] = weakref.ref(mask)
        _keys_memo["keep"], _keys_memo["version"] = keep, version
    except TypeError:  # not weak-referenceable: no memo
        _keys_memo.clear()
    return keep


def _sdpa_backends(device: torch.device):
    """cuDNN first on CUDA (fastest on Hopper for head dim 128), then flash / memory-efficient; unmasked
    calls only, where all three apply."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch < 2.6: no priority order
        return contextlib.nullcontext()


def without_padded_keys(k, v, mask):
    """(k, v, mask) with a mask that only blocks whole keys (text padding, one row for the whole batch;
    allowed_keys) turned into those keys left out and no mask: the same attention, and an attention kernel
    can then run unmasked (SDPA's fused cuDNN / flash kernels instead of the masked fallback; comfy kitchen's
    INT8 attention took 16.3 s per 544p step with HunyuanVideo's text mask where ComfyUI's default SDPA took
    10.5, H100). Any other mask is returned as it is (with k and v)."""
    keep = None if mask is None else allowed_keys(mask)  # on the caller's tensor: the memo knows it by identity
    if keep is None:
        return k, v, mask
    if isinstance(keep, torch.Tensor):
        k, v = k.index_select(2, keep), v.index_select(2, keep)
    return k, v, None


def dense_attention(q, k, v, mask, call: AttentionCall) -> torch.Tensor:
    """Exact softmax attention. q, k, v: [B, H, L, D]; mask additive, broadcastable to [B, H, L, L].
    Padded keys are left out rather than masked (without_padded_keys). Returns [B, L, H*D], the layout the
    blocks' output projections expect."""
    k, v, mask = without_padded_keys(k, v, mask)
    if mask is not None:
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        with _sdpa_backends(q.device):
            out = F.scaled_dot_product_attention(q, k, v)
    b, h, l, d = out.shape
    return out.transpose(1, 2).reshape(b, l, h * d)


class RoutedAttention:
    """Mixin for a model whose attention calls go through `self.attention_fn` (dense_attention unless a
    sparse method is plugged in for a run)."""

    @contextlib.contextmanager
    def attention(self, fn: AttentionFn):
        """Temporarily route every attention call through `fn`."""
        old, self.attention_fn = self.attention_fn, fn
        try:
            yield self
        finally:
            self.attention_fn = old

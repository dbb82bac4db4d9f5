"""Calibrate one block on inputs read one sample at a time: the loop of calibrate._train_block,
with the inputs, block-output targets and MSAD targets kept off the device (RAM or disk) and the
forward/backward optionally under bf16 autocast (the learnable parameters stay float32).

With float32 storage and no autocast it performs the same operations in the same order as
calibrate._train_block, so on the CPU it gives bit-identical parameters.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import msad
from .calibrate import _run_block, block_optimiser, optimise_step
from .capture import BlockInputs


class BlockData:
    """Inputs and FP targets of one block, per sample, materialised on the device on demand.

    inputs.get(j) holds the block's hidden inputs (img, txt) or (x,); `joint` converts a double
    block's outputs (img, txt) into the first single block's input cat(txt, img). Targets are the
    FP block outputs, stored the same way (as (img, txt) for a double block)."""

    def __init__(self, capture, inputs, kind, idx, count, device, dtype, joint=False):
        self.capture, self.inputs, self.kind, self.idx, self.count = capture, inputs, kind, idx, count
        self.device, self.dtype, self.joint = torch.device(device), dtype, joint
        self.targets = None
        self._ropes = {}

    def __len__(self):
        return len(self.capture)

    def _rope(self, j):
        rid = self.capture.meta[j]["rope"]
        if rid not in self._ropes:
            self._ropes[rid] = self.capture.ropes[rid].to(self.device)
        return self._ropes[rid]

    def sample(self, j) -> BlockInputs:
        hidden = self.inputs.get(j)[:2 if self.kind == "double" or self.joint else 1]  # capture entries end (vec, mask)
        if self.joint:
            img, txt = hidden
            hidden = (torch.cat((txt, img), dim=1),)
        ctx = self.capture.store.get(j)
        vec, mask = ctx[-2], ctx[-1]
        put = lambda t: t.to(self.device, self.dtype, non_blocking=True)  # noqa: E731
        args = tuple(put(h) for h in hidden) + (vec.to(self.device, non_blocking=True), self._rope(j),
                                                None if mask is None else mask.to(self.device, non_blocking=True))
        return BlockInputs(args, self.capture.call(j, self.kind, self.idx, self.count))

    def target(self, j) -> torch.Tensor:
        t = self.targets.get(j)
        t = torch.cat(t, dim=1) if len(t) > 1 else t[0]
        return t.to(self.device, non_blocking=True).float()


def autocast(device, amp: bool):
    """bf16 autocast on the device, or nothing (float32 math, as calibrate.calibrate)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def fp_pass(fp_block, data: BlockData, settings, amp: bool, targets_store, msad_store, store_dtype):
    """One FP forward per sample: block outputs -> targets_store, MSAD targets (global map or None,
    salient indices or None, local map or None) -> msad_store (None: not kept), maps in store_dtype."""
    want = msad_store is not None and (settings.uses_global or settings.uses_local)
    for j in range(len(data)):
        with torch.no_grad(), autocast(data.device, amp):
            rec = [] if want else None
            out = _call(fp_block, data.kind, data.sample(j), rec)
            targets_store.append(tuple(o.to(store_dtype) for o in out))
            if want:
                msad_store.append(msad_targets(rec, settings, store_dtype))


def _call(block, kind, inputs, record=None) -> tuple:
    """Like calibrate._run_block but returns the block's own output tuple ((img, txt) or (x,))."""
    from ..models.attention import dense_attention

    def attn(q, k, v, mask, call):
        if record is not None:
            record.append((q, k, mask))
        return dense_attention(q, k, v, mask, call)
    out = block(*inputs.args, attn, inputs.call)
    return tuple(out) if kind == "double" else (out,)


def msad_targets(rec, s, dtype) -> tuple:
    q, k, mask = rec[0]
    glob = msad.global_attention(q, k, mask, s.stride).to(dtype) if s.uses_global else None
    idx = loc = None
    if s.uses_local:
        idx = msad.salient_indices(q, k, mask, s.top_k)
        loc = msad.local_attention(q, k, mask, idx).to(dtype)
    return glob, idx, loc


# Under autocast, hold the quantized copy's frozen float weights in bf16 while it trains (they reach
# the forward only through quantizers.fake_quant_weight, which takes weight.float(): the same values
# when the weights came from a bf16 model, which is checked per tensor), float32 again afterwards.
BF16_FROZEN_WEIGHTS = True


def _frozen_weights_to_bf16(q_block) -> list:
    """QuantLinear weights (fake mode, frozen, float32 holding bf16 values exactly) -> bf16 in place;
    returns the parameters changed, for _frozen_weights_back."""
    from ..quant.linear import QuantLinear
    changed = []
    for m in q_block.modules():
        if isinstance(m, QuantLinear) and m.mode == "fake" and m.weight is not None \
                and m.weight.dtype == torch.float32 and not m.weight.requires_grad:
            w16 = m.weight.data.to(torch.bfloat16)
            if torch.equal(w16.float(), m.weight.data):
                m.weight.data = w16
                changed.append(m.weight)
    return changed


def _frozen_weights_back(params) -> None:
    for p in params:
        p.data = p.data.float()


def train_block(fp_block, q_block, data: BlockData, s, bi: int, n_blocks: int, progress, msad_store, amp: bool):
    """Fit q_block's clipping / smoothing / rotation (calibrate._train_block's schedule and loss).
    msad_store: stored MSAD targets, or None to recompute them from fp_block at every step."""
    lowered = _frozen_weights_to_bf16(q_block) if amp and BF16_FROZEN_WEIGHTS else []
    try:
        return _train(fp_block, q_block, data, s, bi, n_blocks, progress, msad_store, amp)
    finally:
        _frozen_weights_back(lowered)


def _train(fp_block, q_block, data: BlockData, s, bi: int, n_blocks: int, progress, msad_store, amp: bool):
    opt, sched, gen = block_optimiser(q_block, s, len(data), bi)
    use_msad = s.uses_global or s.uses_local
    dev = data.device
    balance, last, loss = {}, {}, None
    for epoch in range(s.epochs):
        for j in torch.randperm(len(data), generator=gen).tolist():
            smp = data.sample(j)
            terms, rec_q = {}, []
            with autocast(dev, amp):
                out = _run_block(q_block, data.kind, smp, rec_q if use_msad else None)
                terms["quant"] = F.mse_loss(out.float(), data.target(j))
                if rec_q:
                    qq, kq, mask = rec_q[0]
                    if msad_store is not None:
                        glob, idx, loc = msad_store.get(j)
                    else:
                        with torch.no_grad():
                            rec = []
                            _call(fp_block, data.kind, smp, rec)
                            glob, idx, loc = msad_targets(rec, s, torch.float32)
                    if s.uses_global:
                        terms["global"] = F.mse_loss(msad.global_attention(qq, kq, mask, s.stride),
                                                     glob.to(dev, non_blocking=True).float())
                    if s.uses_local:
                        terms["local"] = F.mse_loss(msad.local_attention(qq, kq, mask, idx.to(dev)),
                                                    loc.to(dev, non_blocking=True).float())
            loss = optimise_step(opt, sched, terms, balance, s)
            last = {k: v.item() for k, v in terms.items()}
        if progress:
            progress(bi, n_blocks, epoch + 1, loss.item())
    return {f"final_{k}": v for k, v in last.items()}


def output_pass(q_block, data: BlockData, amp: bool, next_store=None) -> float:
    """Mean block-output MSE of q_block against the FP targets (calibrate.block_output_mse); its
    outputs go to next_store when the next block takes the quantized outputs."""
    total = 0.0
    for j in range(len(data)):
        with torch.no_grad(), autocast(data.device, amp):
            out = _call(q_block, data.kind, data.sample(j))
            flat = torch.cat(out, dim=1) if len(out) > 1 else out[0]
            total += F.mse_loss(flat.float(), data.target(j)).item()
        if next_store is not None:
            next_store.append(out)
    return total / len(data)

"""Calibrate one block on inputs read one sample at a time: the loop of calibrate._train_block,
with the inputs, block-output targets and MSAD targets kept off the device (RAM or disk) and the
forward/backward optionally under bf16 autocast (the learnable parameters stay float32).

With float32 storage and no autocast it performs the same operations in the same order as
calibrate._train_block, so on the CPU it gives bit-identical parameters.

The loops read each sample through prefetch.py: the next sample is read (on a thread, into reused
host buffers) and copied to the device while the current one computes, and nothing in a training
step waits for the device (the loss values are read once per epoch and at the end).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import msad
from .calibrate import _run_block, block_optimiser, optimise_step
from .capture import BlockInputs
from .prefetch import DEPTH, HostRing, Part, Prefetcher

# Read samples through prefetch.Prefetcher (False: read and copy each sample when it is used, as before;
# for measurements: benchmarks/dev_profile_calib.py compares both).
PREFETCH = True


class BlockData:
    """Inputs and FP targets of one block, per sample, materialised on the device on demand.

    inputs.get(j) holds the block's hidden inputs (img, txt) or (x,); `joint` converts a double
    block's outputs (img, txt) into the first single block's input cat(txt, img). Targets are the
    FP block outputs, stored the same way (as (img, txt) for a double block). Each sample's constants
    from the capture (HunyuanVideo: vec and text mask; Wan: time projection e, text and image tokens)
    are read once and kept on the device, equal ones as one tensor (so attention.allowed_keys, which
    syncs once per mask tensor, syncs once per block, not per step; Wan's text tokens are held once)."""

    def __init__(self, capture, inputs, kind, idx, count, device, dtype, joint=False):
        self.capture, self.inputs, self.kind, self.idx, self.count = capture, inputs, kind, idx, count
        self.device, self.dtype, self.joint = torch.device(device), dtype, joint
        self.targets = None
        self._ropes = {}
        self._context = None
        self._ring = None

    def __len__(self):
        return len(self.capture)

    def _rope(self, j):
        rid = self.capture.meta[j]["rope"]
        if rid not in self._ropes:
            self._ropes[rid] = self.capture.ropes[rid].to(self.device)
        return self._ropes[rid]

    def _consts(self, j) -> tuple:
        """Sample j's constants on the device (Capture.const_fields' order)."""
        if self._context is None:
            seen, ctx = [], []   # (host tensor, its device copy), one per distinct value
            for i in range(len(self)):
                got = []
                for t in self.capture.store.get(i, self.capture.const_fields(i)):
                    if t is not None:
                        same = next((d for h, d in seen if h.shape == t.shape and h.dtype == t.dtype
                                     and torch.equal(h, t)), None)
                        if same is None:
                            same = t.to(self.device)
                            seen.append((t, same))
                        t = same
                    got.append(t)
                ctx.append(tuple(got))
            self._context = ctx
        return self._context[j]

    def _hidden_fields(self) -> tuple:
        """Positions of the hidden inputs in an inputs entry (cat(txt, img) order when joint)."""
        return (1, 0) if self.joint else ((0, 1) if self.kind == "double" else (0,))

    def _inputs(self, j, hidden) -> BlockInputs:
        return BlockInputs(self.capture.block_args(j, tuple(hidden), self._consts(j), self._rope(j)),
                           self.capture.call(j, self.kind, self.idx, self.count))

    def sample(self, j) -> BlockInputs:
        """Sample j's inputs, read and copied now (the replay and SmoothQuant's statistics use this)."""
        hidden = self.inputs.get(j, self._hidden_fields())
        if self.joint:
            hidden = (torch.cat(hidden, dim=1),)
        return self._inputs(j, (h.to(self.device, self.dtype, non_blocking=True) for h in hidden))

    def target(self, j) -> torch.Tensor:
        t = self.targets.get(j)
        t = torch.cat(t, dim=1) if len(t) > 1 else t[0]
        return t.to(self.device, non_blocking=True).float()

    def host_ring(self) -> HostRing:
        """The block's prefetch buffers, shared by its passes (allocated once per block)."""
        if self._ring is None:
            self._ring = HostRing(DEPTH, pin=self.device.type == "cuda")
        return self._ring

    def prefetch(self, order, targets: bool = False, msad_store=None):
        """Yield (j, BlockInputs, float32 target or None, (global, indices, local) or None) for j in
        `order`, each read and copied to the device while the previous one computes; a sample's tensors
        are valid until the next one is taken. Close the generator when leaving early."""
        hid = self._hidden_fields()
        parts = [Part(self.inputs, hid, self.dtype)] if self.joint else [Part(self.inputs, (f,), self.dtype)
                                                                         for f in hid]
        n_hidden = len(parts)
        if targets:
            parts.append(Part(self.targets, tuple(range(self.targets.width(0))), torch.float32))
        if msad_store is not None:
            parts += [Part(msad_store, (0,), torch.float32), Part(msad_store, (1,)), Part(msad_store, (2,), torch.float32)]
        with Prefetcher(parts, order, self.device, self.host_ring()) as feed:
            for j, got in feed:
                tgt = got[n_hidden] if targets else None
                stored = tuple(got[-3:]) if msad_store is not None else None
                yield j, self._inputs(j, got[:n_hidden]), tgt, stored


def _direct(data, order, targets: bool, msad_store):
    """prefetch()'s items read and copied when used (PREFETCH off, or a data object without prefetch)."""
    dev = data.device
    for j in order:
        stored = None
        if msad_store is not None:
            glob, idx, loc = msad_store.get(j)
            stored = (None if glob is None else glob.to(dev, non_blocking=True).float(),
                      None if idx is None else idx.to(dev),
                      None if loc is None else loc.to(dev, non_blocking=True).float())
        yield j, data.sample(j), data.target(j) if targets else None, stored


def _feed(data, order, targets: bool = False, msad_store=None):
    if PREFETCH and hasattr(data, "prefetch"):
        return data.prefetch(order, targets, msad_store)
    return _direct(data, order, targets, msad_store)


def autocast(device, amp: bool):
    """bf16 autocast on the device, or nothing (float32 math, as calibrate.calibrate)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def fp_pass(fp_block, data: BlockData, settings, amp: bool, targets_store, msad_store, store_dtype):
    """One FP forward per sample: block outputs -> targets_store, MSAD targets (global map or None,
    salient indices or None, local map or None) -> msad_store (None: not kept), maps in store_dtype."""
    want = msad_store is not None and (settings.uses_global or settings.uses_local)
    with contextlib.closing(_feed(data, range(len(data)))) as feed:
        for _, smp, _, _ in feed:
            with torch.no_grad(), autocast(data.device, amp):
                rec = [] if want else None
                out = _call(fp_block, data.kind, smp, rec)
                targets_store.append(tuple(o.to(store_dtype) for o in out))
                if want:
                    msad_store.append(msad_targets(rec, settings, store_dtype))


def _call(block, kind, inputs, record=None) -> tuple:
    """Like calibrate._run_block but returns the block's own output tuple ((img, txt) or (x,): single
    and Wan blocks return one tensor)."""
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


def train_block(fp_block, q_block, data: BlockData, s, bi: int, n_blocks: int, progress, msad_store, amp: bool,
                step_hook=None):
    """Fit q_block's clipping / smoothing / rotation (calibrate._train_block's schedule and loss).
    msad_store: stored MSAD targets, or None to recompute them from fp_block at every step.
    step_hook(step): called at the start of every step (measurements: dev_profile_calib.py)."""
    lowered = _frozen_weights_to_bf16(q_block) if amp and BF16_FROZEN_WEIGHTS else []
    try:
        return _train(fp_block, q_block, data, s, bi, n_blocks, progress, msad_store, amp, step_hook)
    finally:
        _frozen_weights_back(lowered)


def _train(fp_block, q_block, data: BlockData, s, bi: int, n_blocks: int, progress, msad_store, amp: bool,
           step_hook=None):
    opt, sched, gen = block_optimiser(q_block, s, len(data), bi)
    use_msad = s.uses_global or s.uses_local
    dev = data.device
    # every epoch's sample order up front (the same draws as one randperm per epoch), so that reads run
    # ahead across epoch boundaries
    orders = [torch.randperm(len(data), generator=gen).tolist() for _ in range(s.epochs)]
    stored_targets = msad_store if use_msad else None
    balance, last, loss, step = {}, {}, None, 0
    with contextlib.closing(_feed(data, [j for o in orders for j in o], True, stored_targets)) as feed:
        for epoch in range(s.epochs):
            for _ in orders[epoch]:
                if step_hook is not None:
                    step_hook(step)
                step += 1
                j, smp, target, stored = next(feed)
                terms, rec_q = {}, []
                with autocast(dev, amp):
                    out = _run_block(q_block, data.kind, smp, rec_q if use_msad else None)
                    terms["quant"] = F.mse_loss(out.float(), target)
                    if rec_q:
                        qq, kq, mask = rec_q[0]
                        if stored is not None:
                            glob, idx, loc = stored
                        else:
                            with torch.no_grad():
                                rec = []
                                _call(fp_block, data.kind, smp, rec)
                                glob, idx, loc = msad_targets(rec, s, torch.float32)
                        if s.uses_global:
                            terms["global"] = F.mse_loss(msad.global_attention(qq, kq, mask, s.stride), glob)
                        if s.uses_local:
                            terms["local"] = F.mse_loss(msad.local_attention(qq, kq, mask, idx), loc)
                loss = optimise_step(opt, sched, terms, balance, s)
                last = {k: v.detach() for k, v in terms.items()}   # read once, at the end: no sync per step
            if progress:
                progress(bi, n_blocks, epoch + 1, loss.item())
    return {f"final_{k}": v.item() for k, v in last.items()}


def output_pass(q_block, data: BlockData, amp: bool, next_store=None) -> float:
    """Mean block-output MSE of q_block against the FP targets (calibrate.block_output_mse); its
    outputs go to next_store when the next block takes the quantized outputs."""
    losses = []
    with contextlib.closing(_feed(data, range(len(data)), True)) as feed:
        for _, smp, target, _ in feed:
            with torch.no_grad(), autocast(data.device, amp):
                out = _call(q_block, data.kind, smp)
                flat = torch.cat(out, dim=1) if len(out) > 1 else out[0]
                losses.append(F.mse_loss(flat.float(), target))
            if next_store is not None:
                next_store.append(out)
    total = 0.0
    for v in losses:   # read at the end, summed in sample order as before
        total += v.item()
    return total / len(data)

"""Capture only the first block's inputs, with a model that holds one block on the device at a time.

Full-model forwards along sampling trajectories are needed to reach the calibration states x_t,
but only block 0's inputs are kept: every later block's inputs are computed from its predecessor
during calibration (streaming.py). The model used here keeps its small parts (embedders, token
refiner, final layer) on the device and builds each block from a BlockSource just for its call.

A captured sample is the block's hidden input(s) plus the per-sample constants every block of that
model receives unchanged: HunyuanVideo (img, txt, vec, mask) with RoPE kept apart, Wan (x, e, text,
image) with RoPE kept apart (layout "wan": e is the time projection, text / image the embedded text
and CLIP tokens; only x is passed from block to block).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models import AttentionCall, StepInfo
from ..models.family import WAN, family_of
from ..models.sampler import flow_sigmas, initial_noise, sample_euler
from ..models.wan import BLOCK_TYPE as WAN_CALL_TYPE
from .capture import WAN_KIND, n_trajectories, spread_steps
from .tensor_store import TensorStore

WAN_LAYOUT = "wan"  # Capture meta "layout" of a Wan sample; absent: HunyuanVideo's


class StreamedBlock(nn.Module):
    """Stands in for block (kind, idx): builds it from the source on each call, frees it after."""

    def __init__(self, source, kind: str, idx: int, device, dtype):
        super().__init__()
        self.source, self.kind, self.idx, self.device, self.dtype = source, kind, idx, torch.device(device), dtype

    def forward(self, *args):
        blk = self.source.block(self.kind, self.idx, self.device, self.dtype)
        try:
            return blk(*args)
        finally:
            del blk


def streamed_dit(source, device, dtype=None) -> nn.Module:
    """The source's DiT (HunyuanVideoDiT or WanDiT) whose blocks stream from `source`; the rest is
    loaded on `device`."""
    model = source.family.build(source.config, device="meta")
    other = {k: v.to(device=device, dtype=dtype or v.dtype, copy=True) for k, v in source.other_tensors().items()}
    missing, unexpected = model.load_state_dict(other, strict=False, assign=True)
    if unexpected or any(not k.startswith(tuple(source.prefixes.values())) for k in missing):
        raise ValueError(f"source weights do not match the architecture: missing {missing[:3]}, extra {unexpected[:3]}")
    if source.family is WAN:
        model.blocks = nn.ModuleList(StreamedBlock(source, WAN_KIND, i, device, dtype)
                                     for i in range(source.config.num_layers))
    else:
        model.double_blocks = nn.ModuleList(StreamedBlock(source, "double", i, device, dtype)
                                            for i in range(source.config.depth_double))
        model.single_blocks = nn.ModuleList(StreamedBlock(source, "single", i, device, dtype)
                                            for i in range(source.config.depth_single))
    return model.requires_grad_(False).eval()


@dataclass
class Capture:
    """Block 0's inputs for every sample: store entry j = (hidden..., vec, mask) for HunyuanVideo,
    (x, e, text, image) for Wan (meta layout "wan"); ropes[j] its RoPE table (shared between samples
    with the same grid); meta[j] = txt_len, grid, step, sigmas (and layout)."""
    store: TensorStore
    ropes: list
    meta: list

    def __len__(self):
        return len(self.meta)

    def is_wan(self, j: int) -> bool:
        return self.meta[j].get("layout") == WAN_LAYOUT

    def const_fields(self, j: int) -> tuple:
        """Positions, in store entry j, of the per-sample constants (the same for every block)."""
        return (-3, -2, -1) if self.is_wan(j) else (-2, -1)

    def block_args(self, j: int, hidden: tuple, consts: tuple, rope) -> tuple:
        """A block's positional inputs (attention_fn and call excluded) from its hidden input(s), sample
        j's constants (const_fields' order) and its RoPE table."""
        if self.is_wan(j):
            e, text, image = consts
            return (*hidden, e, rope, text, image)
        vec, mask = consts
        return (*hidden, vec, rope, mask)

    def call(self, j: int, kind: str, idx: int, count: int) -> AttentionCall:
        m = self.meta[j]
        step = None if m["step"] is None else StepInfo(m["step"], torch.tensor(m["sigmas"], dtype=torch.float32))
        kind = WAN_CALL_TYPE if kind == WAN_KIND else kind   # WanDiT's own calls name its blocks so
        return AttentionCall(kind, idx, count, m["txt_len"], tuple(m["grid"]), step)

    def save_meta(self, path: Path) -> None:
        from .calibrate import _atomic_write_text
        from ..models.weights import atomic_save_safetensors
        atomic_save_safetensors({f"rope.{i}": r for i, r in enumerate(self.ropes)}, path.with_suffix(".ropes"))
        _atomic_write_text(path, json.dumps(self.meta))

    @classmethod
    def open(cls, folder: Path, pin: bool = False) -> "Capture":
        from safetensors.torch import load_file
        store = TensorStore.open(folder / "capture.index.json", pin)
        meta = json.loads((folder / "capture.meta.json").read_text())
        r = load_file(str(folder / "capture.meta.ropes"))
        return cls(store, [r[f"rope.{i}"] for i in range(len(r))], meta)


def _detach(t):
    return None if t is None else t.detach()


def capture_first_block(model, run_trajectory: Callable, n_samples: int, steps: int, per_trajectory: int,
                        store: TensorStore, store_dtype=None, picks: Optional[list] = None) -> Capture:
    """Run the trajectories and keep the first block's inputs at n_samples steps spread over the
    schedule (the steps and their order are those of capture.capture_trajectories), or at the step
    indices `picks` (one per sample, trajectory j taking picks[j::n_trajectories]: Wan's expert
    segments, as wan_calibration.capture_wan). run_trajectory(j, on_step) runs trajectory j; hidden
    states are stored in `store_dtype`. `model` is a HunyuanVideoDiT or a WanDiT."""
    targets = spread_steps(n_samples, steps) if picks is None else list(picks)
    if len(targets) != n_samples:
        raise ValueError(f"{len(targets)} capture steps given for {n_samples} samples")
    n_traj = n_trajectories(n_samples, per_trajectory)
    wan = family_of(model) is WAN
    if wan:
        first, n_hidden = model.blocks[0], 1
    else:
        first = model.double_blocks[0] if len(model.double_blocks) else model.single_blocks[0]
        n_hidden = 2 if len(model.double_blocks) else 1
    cap = Capture(store, [], [])
    state = {"on": False}

    def hook(module, args):
        if not state["on"]:
            return
        hidden = [a.detach().to(dtype=store_dtype or a.dtype) for a in args[:n_hidden]]
        if wan:   # WanBlock(x, e, rope, text, image, attention_fn, call)
            e, rope, text, image = args[1:5]
            consts = (e.detach(), _detach(text), _detach(image))
        else:     # HunyuanVideo (hidden..., vec, rope, mask, attention_fn, call)
            vec, rope, mask = args[n_hidden:n_hidden + 3]
            consts = (vec.detach(), _detach(mask))
        call = args[-1]
        rope = rope.detach().cpu()
        rid = next((i for i, r in enumerate(cap.ropes) if r.shape == rope.shape and torch.equal(r, rope)), None)
        if rid is None:
            cap.ropes.append(rope.clone())
            rid = len(cap.ropes) - 1
        store.append((*hidden, *consts))
        st = call.step
        m = {"txt_len": call.txt_len, "grid": list(call.grid), "rope": rid, "n_hidden": n_hidden,
             "step": None if st is None else st.index, "sigmas": None if st is None else st.sigmas.tolist()}
        if wan:
            m["layout"] = WAN_LAYOUT
        cap.meta.append(m)

    handle = first.register_forward_pre_hook(hook)
    try:
        for j in range(n_traj):
            wanted = set(targets[j::n_traj])

            def on_step(step, wanted=wanted):
                if step.index > max(wanted):  # nothing left to capture: skip the rest of the trajectory
                    raise _TrajectoryDone  # (Wan 2.2's high-noise expert: about half of every run)
                state["on"] = step.index in wanted
            try:
                run_trajectory(j, on_step)
            except _TrajectoryDone:
                pass
    finally:
        handle.remove()
    expected = sum(len(set(targets[j::n_traj])) for j in range(n_traj))
    if len(cap) < expected:   # e.g. a Wan 2.2 step to capture that another expert ran
        raise ValueError(f"captured {len(cap)} of {expected} samples: the steps to capture must be run by the model "
                         "being calibrated (for Wan 2.2, its sigma_range must lie inside the steps its expert serves)")
    return cap


class _TrajectoryDone(Exception):
    """Raised from a step callback once a trajectory's last sample is captured."""


def trajectory_runner(model, cond, latent_shape, steps: int, seed: int, n_traj: int,
                      on_step: Optional[Callable[[int, int, int], None]] = None) -> Callable:
    """run(j, cb): the Euler trajectory of the prompt with seed + j, cb(step) called at each step and
    on_step(j, n_traj, step index) after it (progress; may raise to stop). Both capture paths use it."""
    param = next(model.parameters())
    ctx = cond.context.to(param)
    pooled = None if cond.pooled is None else cond.pooled.to(param)
    mask = None if cond.mask is None else cond.mask.to(param.device)

    def run(j, cb):
        noise = initial_noise((1, *latent_shape[-4:]), seed + j, param.device, param.dtype)

        def both(step):
            cb(step)
            if on_step is not None:
                on_step(j, n_traj, step.index)
        return sample_euler(model, noise, ctx, pooled, flow_sigmas(steps), attention_mask=mask,
                            guidance=cond.guidance, on_step=both, concat=getattr(cond, "concat", None),
                            tokens=getattr(cond, "tokens", None))
    return run


def wan_trajectory_runner(model, cond, latent_shape, sigmas: torch.Tensor, seed: int, n_traj: int,
                          on_step: Optional[Callable[[int, int, int], None]] = None,
                          expert: Optional[Callable[[float], nn.Module]] = None) -> Callable:
    """run(j, cb): Wan's Euler trajectory (wan_calibration.sample_wan) of `cond` (a WanConditioning) from
    the noise of seed + j, over the noisy latent [C, T, H, W] (I2V's concatenated channels come from
    cond); expert(sigma) picks the model of each step (Wan 2.2's two experts), else `model` runs them all.
    Noise is drawn as wan_calibration.capture_wan draws it, in the dtype of the model's time embedding
    (the patch embedding, its first parameter, may be kept in float32 while the rest is bf16)."""
    from .wan_calibration import sample_wan
    param = model.time_embedding[0].weight

    def run(j, cb):
        noise = initial_noise((1, *tuple(latent_shape)[-4:]), seed + j, param.device, param.dtype)

        def both(step):
            cb(step)
            if on_step is not None:
                on_step(j, n_traj, step.index)
        return sample_wan(model, noise, cond, sigmas, both, expert)
    return run

"""Capture only the first block's inputs, with a model that holds one block on the device at a time.

Full-model forwards along sampling trajectories are needed to reach the calibration states x_t,
but only block 0's inputs are kept: every later block's inputs are computed from its predecessor
during calibration (streaming.py). The model used here keeps its small parts (embedders, token
refiner, final layer) on the device and builds each block from a BlockSource just for its call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models import AttentionCall, HunyuanVideoDiT, StepInfo
from ..models.sampler import flow_sigmas, initial_noise, sample_euler
from .capture import n_trajectories, spread_steps
from .tensor_store import TensorStore


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


def streamed_dit(source, device, dtype=None) -> HunyuanVideoDiT:
    """A HunyuanVideoDiT whose blocks stream from `source`; the rest is loaded on `device`."""
    model = HunyuanVideoDiT(source.config, device="meta")
    other = {k: v.to(device=device, dtype=dtype or v.dtype, copy=True) for k, v in source.other_tensors().items()}
    missing, unexpected = model.load_state_dict(other, strict=False, assign=True)
    if unexpected or any(not k.startswith(("double_blocks.", "single_blocks.")) for k in missing):
        raise ValueError(f"source weights do not match the architecture: missing {missing[:3]}, extra {unexpected[:3]}")
    model.double_blocks = nn.ModuleList(StreamedBlock(source, "double", i, device, dtype)
                                        for i in range(source.config.depth_double))
    model.single_blocks = nn.ModuleList(StreamedBlock(source, "single", i, device, dtype)
                                        for i in range(source.config.depth_single))
    return model.requires_grad_(False).eval()


@dataclass
class Capture:
    """Block 0's inputs for every sample: store entry j = (hidden..., vec, mask); ropes[j] its RoPE
    table (shared between samples with the same grid); meta[j] = txt_len, grid, step, sigmas."""
    store: TensorStore
    ropes: list
    meta: list

    def __len__(self):
        return len(self.meta)

    def call(self, j: int, kind: str, idx: int, count: int) -> AttentionCall:
        m = self.meta[j]
        step = None if m["step"] is None else StepInfo(m["step"], torch.tensor(m["sigmas"], dtype=torch.float32))
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


def capture_first_block(model, run_trajectory: Callable, n_samples: int, steps: int, per_trajectory: int,
                        store: TensorStore, store_dtype=None) -> Capture:
    """Run the trajectories and keep the first block's inputs at n_samples steps spread over the
    schedule (the steps and their order are those of capture.capture_trajectories).
    run_trajectory(j, on_step) runs trajectory j; hidden states are stored in `store_dtype`."""
    targets = spread_steps(n_samples, steps)
    n_traj = n_trajectories(n_samples, per_trajectory)
    first = model.double_blocks[0] if len(model.double_blocks) else model.single_blocks[0]
    n_hidden = 2 if len(model.double_blocks) else 1
    cap = Capture(store, [], [])
    state = {"on": False}

    def hook(module, args):
        if not state["on"]:
            return
        hidden = [a.detach().to(dtype=store_dtype or a.dtype) for a in args[:n_hidden]]
        vec, rope, mask = args[n_hidden:n_hidden + 3]
        call = args[-1]
        rope = rope.detach().cpu()
        rid = next((i for i, r in enumerate(cap.ropes) if r.shape == rope.shape and torch.equal(r, rope)), None)
        if rid is None:
            cap.ropes.append(rope.clone())
            rid = len(cap.ropes) - 1
        store.append((*hidden, vec.detach(), None if mask is None else mask.detach()))
        st = call.step
        cap.meta.append({"txt_len": call.txt_len, "grid": list(call.grid), "rope": rid, "n_hidden": n_hidden,
                         "step": None if st is None else st.index,
                         "sigmas": None if st is None else st.sigmas.tolist()})

    handle = first.register_forward_pre_hook(hook)
    try:
        for j in range(n_traj):
            wanted = set(targets[j::n_traj])

            def on_step(step, wanted=wanted):
                state["on"] = step.index in wanted
            run_trajectory(j, on_step)
    finally:
        handle.remove()
    return cap


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
                            guidance=cond.guidance, on_step=both)
    return run

"""Capture every block's inputs from the full-precision model along real sampling trajectories.

A calibration sample is one (latent x_t, timestep, text) model call; its captured inputs are what
each double/single block received. Block-wise calibration then feeds each block FP inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class BlockInputs:
    """Positional inputs of one block call (attention_fn removed), kept on `device`."""
    args: tuple
    call: object


WAN_KIND = "wan"  # Wan's one kind of block, `blocks.<i>` in the state dict


def block_list(model):
    """[(kind, index, module)] in execution order: HunyuanVideo's double then single blocks, or Wan's blocks."""
    if not hasattr(model, "double_blocks") and isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        return [(WAN_KIND, i, b) for i, b in enumerate(model.blocks)]
    return [("double", i, b) for i, b in enumerate(model.double_blocks)] + \
           [("single", i, b) for i, b in enumerate(model.single_blocks)]


def block_name(kind: str, idx: int) -> str:
    """The block's module path (and state-dict prefix): 'double_blocks.3', 'single_blocks.0', 'blocks.7'."""
    return f"blocks.{idx}" if kind == WAN_KIND else f"{kind}_blocks.{idx}"


def spread_steps(n_samples: int, steps: int) -> list:
    """n_samples step indices spread evenly over the whole schedule (repeats allowed if n > steps)."""
    return [int(round(x)) for x in np.linspace(0, steps - 1, n_samples)]


def capture(model, run_trajectory, capture_steps, device="cpu") -> dict:
    """Run `run_trajectory(on_step)` (a sampler run) and record block inputs at the listed steps.

    Returns {(kind, index): [BlockInputs per captured call]}.
    """
    wanted = set(capture_steps)
    state = {"on": False}
    out = {(kind, i): [] for kind, i, _ in block_list(model)}
    handles = []

    def on_step(step):
        state["on"] = step.index in wanted

    def hook_for(key):
        def hook(module, args):
            if state["on"]:
                tensors = tuple(a.detach().to(device) if torch.is_tensor(a) else a for a in args[:-2])
                out[key].append(BlockInputs(tensors, args[-1]))
        return hook

    for kind, i, block in block_list(model):
        handles.append(block.register_forward_pre_hook(hook_for((kind, i))))
    try:
        run_trajectory(on_step)
    finally:
        for h in handles:
            h.remove()
    return out


def n_trajectories(n_samples: int, per_trajectory: int) -> int:
    return -(-n_samples // per_trajectory)


def capture_trajectories(model, run_trajectory, n_samples: int, steps: int, per_trajectory: int,
                         device="cpu") -> dict:
    """Block inputs at n_samples steps spread over the whole schedule, per_trajectory of them from each
    sampling run; run_trajectory(j, on_step) runs trajectory j. Returns {(kind, index): [BlockInputs]}."""
    targets = spread_steps(n_samples, steps)
    n_traj = n_trajectories(n_samples, per_trajectory)
    merged = {}
    for j in range(n_traj):
        got = capture(model, lambda cb: run_trajectory(j, cb), targets[j::n_traj], device)
        for key, items in got.items():
            merged.setdefault(key, []).extend(items)
    return merged


def check_calibration_latent(model, shape) -> tuple:
    """Validate a calibration latent shape [C, T, H, W] (or with a batch dim) against the model;
    returns the video token grid. Raises ValueError saying what to change."""
    shape = tuple(shape)
    if len(shape) == 5:
        shape = shape[1:]
    if len(shape) != 4:
        raise ValueError(f"calibration latent must be [channels, frames, height, width], got {shape}")
    return model.token_grid(torch.empty((1, *shape), device="meta"))


def capture_embedded(model, n_samples: int = 20, steps: int = 20, per_trajectory: int = 4, seed: int = 0,
                     device="cpu", latent_shape=None) -> dict:
    """Calibration data for the embedded tiny model: random prompts, steps spread over the schedule.
    Captured tensors are stored on `device` (e.g. "cpu" to keep accelerator memory for one block)."""
    from ..models.tiny.embedded import LATENT_SHAPE, generate
    from ..models.tiny.shapes import random_scenes

    latent_shape = tuple(latent_shape or LATENT_SHAPE)
    check_calibration_latent(model, latent_shape)
    if n_samples < 1 or steps < 1:
        raise ValueError("n_samples and steps must be at least 1")

    scenes = random_scenes(n_trajectories(n_samples, per_trajectory), torch.Generator().manual_seed(seed))

    def run(j, on_step):
        return generate(model, [scenes[j].prompt()], [seed * 1000 + j], steps=steps, latent_shape=latent_shape,
                        on_step=on_step)
    return capture_trajectories(model, run, n_samples, steps, per_trajectory, device)

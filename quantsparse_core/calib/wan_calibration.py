"""MSAD calibration of a Wan transformer: capture its blocks' inputs along flow-matching Euler trajectories of
the user's conditioning, then the same block-wise loop as HunyuanVideo (calibrate.py), whose MSAD terms see
Wan's video-only self-attention (cross-attention is not routed through attention_fn, so its maps are not
distilled: text and CLIP tokens come from other models and are a few hundred keys).

Wan 2.2 A14B is two experts switched at a boundary sigma: each expert is calibrated on the trajectory segment
it serves (`sigma_range`), with the trajectories themselves run by whichever expert serves each step
(`expert`), so the low-noise expert sees the states the high-noise one hands it, as in ComfyUI's stock graph.

In memory: the model and captures live where the caller put them (tiny and test models). The 14B path streams
one block at a time: stream_pipeline.compress_streaming with a Wan source and a WanSchedule (same results).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..models.attention import StepInfo
from ..models.sampler import WAN_SHIFT, flow_sigmas, initial_noise
from ..models.sampler import sample_wan as sample_wan_euler
from .calibrate import CalibSettings, calibrate
from .capture import capture, check_calibration_latent, n_trajectories

@dataclass
class WanConditioning:
    """One prompt as WanDiT consumes it: text tokens [1, L, 4096]; I2V adds CLIP image tokens [1, 257, 1280]
    (Wan 2.1) and/or the channels concatenated to the noisy latent (mask + image latent, [1, C, T, H, W])."""
    context: torch.Tensor
    clip_fea: Optional[torch.Tensor] = None
    concat: Optional[torch.Tensor] = None


def sample_wan(model, noise: torch.Tensor, cond: WanConditioning, sigmas: torch.Tensor,
               on_step: Optional[Callable[[StepInfo], None]] = None,
               expert: Optional[Callable[[float], torch.nn.Module]] = None) -> torch.Tensor:
    """models.sampler.sample_wan on a WanConditioning."""
    return sample_wan_euler(model, noise, cond.context, sigmas, cond.clip_fea, cond.concat, on_step, expert)


def segment_steps(sigmas: torch.Tensor, sigma_range=None) -> list:
    """Step indices whose sigma lies in [low, high) (all steps when sigma_range is None)."""
    steps = range(len(sigmas) - 1)
    if sigma_range is None:
        return list(steps)
    low, high = sigma_range
    if not 0 <= low < high:
        raise ValueError(f"sigma_range must be (low, high) with 0 <= low < high, got {sigma_range}")
    return [i for i in steps if low <= float(sigmas[i]) < high]


def capture_wan(model, cond: WanConditioning, latent_shape, n_samples: int = 20, steps: int = 20,
                per_trajectory: int = 4, seed: int = 0, shift: float = WAN_SHIFT, sigma_range=None,
                expert=None, device="cpu", on_step=None) -> dict:
    """{(kind, index): [BlockInputs]} of `model`'s blocks at n_samples steps spread evenly over the steps of
    the schedule inside sigma_range, from trajectories with seeds seed, seed+1, ... (latent [C, T, H, W] of
    the noisy part: I2V's concatenated channels come from `cond`)."""
    if n_samples < 1 or steps < 1 or per_trajectory < 1:
        raise ValueError("samples, steps and samples per trajectory must all be at least 1")
    noisy = tuple(latent_shape)
    extra = 0 if cond.concat is None else cond.concat.shape[1]
    check_calibration_latent(model, (noisy[0] + extra, *noisy[1:]))
    sigmas = flow_sigmas(steps, shift)
    eligible = segment_steps(sigmas, sigma_range)
    if not eligible:
        raise ValueError(f"no step of a {steps}-step schedule (shift {shift}) has its sigma in {sigma_range}: use "
                         "more steps or a wider range")
    picks = [eligible[int(round(x))] for x in np.linspace(0, len(eligible) - 1, n_samples)]
    n_traj = n_trajectories(n_samples, per_trajectory)
    dev = next(model.parameters()).device
    merged = {}
    for j in range(n_traj):
        def run(cb, j=j):
            def both(step):
                cb(step)
                if on_step is not None:
                    on_step(j, n_traj, step.index)
            noise = initial_noise((1, *noisy), seed + j, device=dev)
            return sample_wan(model, noise, cond, sigmas, both, expert)
        for key, items in capture(model, run, picks[j::n_traj], device).items():
            merged.setdefault(key, []).extend(items)
    return merged


def calibrate_wan(model, cond: WanConditioning, latent_shape, settings: CalibSettings, *, n_samples: int = 20,
                  steps: int = 20, per_trajectory: int = 4, seed: int = 0, shift: float = WAN_SHIFT,
                  sigma_range=None, expert=None, device=None, checkpoint_dir=None, progress=None) -> dict:
    """Capture, then quantize `model` in place block by block (calibrate.py); returns the report."""
    captured = capture_wan(model, cond, latent_shape, n_samples, steps, per_trajectory, seed, shift, sigma_range,
                           expert)
    return calibrate(model, captured, settings, checkpoint_dir=checkpoint_dir, progress=progress, device=device)

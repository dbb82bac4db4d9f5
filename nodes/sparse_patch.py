"""Sparse attention + SSAR inside ComfyUI, through its supported hooks only.

On a clone of the ModelPatcher:
- `optimized_attention_override` (chained to any override already there) routes the double/single
  blocks' attention to quantsparse_core's SSARAttention; the token refiner and calls outside a
  sampling run fall through unchanged;
- a DIFFUSION_MODEL wrapper records the latent shape of each model call (the video token grid);
- an OUTER_SAMPLE wrapper gives every sampling run fresh state (masks, caches), so nothing leaks
  between runs or into other users of the same MODEL, and logs what the run cost.
The original ModelPatcher and its model are never modified.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, replace
from typing import Dict, Optional

import torch

from quantsparse_core.models.attention import AttentionCall, StepInfo
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

KEY = "quantsparse_sparse"
log = logging.getLogger("quantsparse")


def check_hunyuan_video(model) -> None:
    """Fail with what to do when a MODEL is not ComfyUI's HunyuanVideo."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    name = type(inner).__name__ if inner is not None else type(model).__name__
    if name != "HunyuanVideo":
        raise ValueError(f"QuantSparse works with HunyuanVideo models, but this MODEL is {name}; "
                         "load a HunyuanVideo diffusion model (or a QuantSparse compressed checkpoint)")


class SparseRun:
    """One sampling run's state: an SSARAttention per group of conds (cond and uncond may come in
    separate calls of the same batch size, so they must not share caches)."""

    def __init__(self, settings: SparseSettings, patch_size):
        self.settings = settings
        self.patch_size = tuple(int(p) for p in patch_size)
        self.latent_shape: Optional[tuple] = None
        self.step: Optional[StepInfo] = None  # of the current model call; None outside the run's schedule
        self.by_group: Dict[tuple, SSARAttention] = {}

    def fresh(self) -> "SparseRun":
        return SparseRun(self.settings, self.patch_size)

    def grid(self) -> tuple:
        t, h, w = self.latent_shape[-3:]
        pt, ph, pw = self.patch_size
        return t // pt, h // ph, w // pw

    def attention_for(self, group: tuple) -> SSARAttention:
        if group not in self.by_group:
            self.by_group[group] = SSARAttention(replace(self.settings))
        return self.by_group[group]

    def summary(self) -> str:
        stats = [a.stats for a in self.by_group.values()]
        dense = sum(s["dense"] for s in stats)
        sparse = sum(s["sparse"] for s in stats)
        cost = sum(s["sparse_density"] for s in stats)
        total = dense + sparse
        eff = (dense + cost) / total if total else 1.0
        return (f"{int(dense)} dense and {int(sparse)} sparse attention calls; effective attention cost "
                f"{eff:.2f} of dense (density {self.settings.density:.2f}, refresh every {self.settings.tau})")


def step_index(sigma: torch.Tensor, sample_sigmas: torch.Tensor) -> Optional[int]:
    """Index of the current sigma in the run's schedule, or None if it is not in it."""
    s = float(sigma.flatten()[0])
    sched = sample_sigmas.detach().float().cpu().flatten()  # a no-op when already on the CPU
    i = int(torch.argmin((sched - s).abs()))
    return i if math.isclose(float(sched[i]), s, rel_tol=1e-4, abs_tol=1e-6) else None


def _fall_through(previous, func, args, kwargs):
    return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)


def make_override(previous=None):
    """An optimized_attention_override that applies the run's SSARAttention, else defers."""

    def quantsparse_attention(func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        run: Optional[SparseRun] = to.get(KEY)
        block_type = to.get("block_type")
        if (run is None or run.latent_shape is None or run.step is None or block_type not in ("double", "single")
                or not kwargs.get("skip_reshape", False)):
            return _fall_through(previous, func, args, kwargs)
        q, k, v = args[0], args[1], args[2]
        grid = run.grid()
        txt_len = q.shape[2] - grid[0] * grid[1] * grid[2]
        if txt_len < 0:
            raise ValueError(f"attention sequence of {q.shape[2]} tokens is shorter than the latent's video grid "
                             f"{grid}: this model's token layout is not HunyuanVideo's [text, video]")
        call = AttentionCall(block_type, int(to.get("block_index", 0)), int(to.get("total_blocks", 1)),
                             txt_len, grid, run.step)
        group = tuple(int(c) for c in to.get("cond_or_uncond", ()))
        out = run.attention_for(group)(q, k, v, kwargs.get("mask"), call)
        if kwargs.get("skip_output_reshape", False):
            b, length, _ = out.shape
            out = out.view(b, length, q.shape[1], -1).transpose(1, 2)
        return out

    quantsparse_attention.quantsparse_previous = previous
    return quantsparse_attention


def _transformer_options(args, kwargs) -> dict:
    to = kwargs.get("transformer_options")
    if isinstance(to, dict):
        return to
    for a in reversed(args):
        if isinstance(a, dict):
            return a
    return {}


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Once per model call: the latent's token grid and the step (one host sync here, none per attention)."""
    to = _transformer_options(args, kwargs)
    run = to.get(KEY)
    if run is not None and torch.is_tensor(args[0]):
        x = args[0]
        if x.ndim != 5:
            raise ValueError(f"QuantSparse sparse attention needs a video latent [B, C, T, H, W], got {tuple(x.shape)}")
        run.latent_shape = tuple(x.shape)
        run.step = None
        sample, sigma = to.get("sample_sigmas"), to.get("sigmas")
        if sample is not None and sigma is not None:
            sample = sample.detach().float().cpu()
            idx = step_index(sigma, sample)
            run.step = None if idx is None else StepInfo(idx, sample)
    return executor(*args, **kwargs)


def outer_sample_wrapper(executor, *args, **kwargs):
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    to = guider.model_options.setdefault("transformer_options", {})
    run = to[KEY].fresh()
    to[KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        if run.by_group:
            log.info("QuantSparse: %s", run.summary())
        guider.model_options = original


def apply_sparse(model, settings: SparseSettings, fused: bool = True):
    """A clone of `model` (a ComfyUI ModelPatcher) whose sampling runs use sparse attention + SSAR.
    fused: its double/single blocks also run QuantSparse's fused forms (nodes/fused_blocks.py: grouped
    small ops, producer-quantized activations, q/k norm + RoPE kernel); False runs ComfyUI's blocks
    (and removes fused blocks a loader had turned on)."""
    import comfy.patcher_extension

    from .fused_blocks import install_fused_blocks, remove_fused_blocks

    check_hunyuan_video(model)
    patched = model.clone()
    to = patched.model_options.setdefault("transformer_options", {})
    to = patched.model_options["transformer_options"] = dict(to)  # never write into a shared dict
    previous = to.get("optimized_attention_override")
    # Re-patching an already patched MODEL replaces our settings instead of stacking two of us.
    previous = getattr(previous, "quantsparse_previous", previous)
    to["optimized_attention_override"] = make_override(previous)
    dit = model.model.diffusion_model
    if settings.layers is None:  # the auto cache placement must budget for every sparse block, not those seen so far
        joint = len(getattr(dit, "double_blocks", [])) + len(getattr(dit, "single_blocks", []))
        settings = replace(settings, layers=max(1, joint - settings.warmup_blocks))
    to[KEY] = SparseRun(settings, dit.patch_size)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, wrapper)
    (install_fused_blocks if fused else remove_fused_blocks)(patched)
    log.info("QuantSparse sparse attention: %s (fused blocks %s)", asdict(settings), "on" if fused else "off")
    return patched

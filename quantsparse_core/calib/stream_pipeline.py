"""The Calibrate node's job, streaming: capture block-0 inputs with a block-streaming model, calibrate
block by block from a BlockSource, assemble the compressed file. Needs no ComfyUI (tested here).

Resume: everything of one job (same output, weights, settings and data) lives in one partial folder:
the capture (written once, then reused), and each finished block's parts. A new run with the same
inputs reuses the capture, replays the finished blocks and writes the same file.

HunyuanVideo (a Conditioning) and Wan (a WanConditioning: Euler trajectories at Wan's shift, I2V
conditioning, Wan 2.2's expert segments as in wan_calibration.capture_wan) share everything after
the capture: the block loop, resume and the file (its header names the source's family).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..models.family import WAN
from ..models.sampler import flow_sigmas
from ..quant.policy import default_policy, storage_bytes
from .capture import check_calibration_latent, n_trajectories
from .pipeline import SAMPLES_PER_TRAJECTORY, Conditioning, model_latent_shape, resume_folder, state_dict_hash
from .pipeline import job_data as hunyuan_job_data
from .stream_budget import check_fits, estimate
from .stream_capture import Capture, capture_first_block, streamed_dit, trajectory_runner, wan_trajectory_runner
from .streaming import assemble, calibrate_streaming
from .tensor_store import TensorStore
from .wan_calibration import WAN_SHIFT, WanConditioning, segment_steps


@dataclass
class WanSchedule:
    """How a Wan job's trajectories run and which steps it calibrates on (wan_calibration.capture_wan's
    arguments): the sampling shift, the sigma range of the expert being calibrated (None: every step),
    and expert(sigma) -> the BlockSource serving that step (None: the calibrated source serves all)."""
    shift: float = WAN_SHIFT
    sigma_range: Optional[tuple] = None
    expert: Optional[Callable] = None

    def picks(self, n_samples: int, steps: int) -> list:
        """The step index of each sample: n_samples spread evenly over the steps inside sigma_range."""
        sigmas = flow_sigmas(steps, self.shift)
        eligible = segment_steps(sigmas, self.sigma_range)
        if not eligible:
            raise ValueError(f"no step of a {steps}-step schedule (shift {self.shift}) has its sigma in "
                             f"{self.sigma_range}: use more steps or a wider range")
        return [eligible[int(round(x))] for x in np.linspace(0, len(eligible) - 1, n_samples)]

    def expert_sources(self, source, steps: int) -> list:
        """The distinct sources that run the trajectory's steps, in order of first use (source first)."""
        if self.expert is None:
            return [source]
        out = [source]
        for s in flow_sigmas(steps, self.shift)[:-1].tolist():
            src = self.expert(s)
            if not any(src is o for o in out):
                out.append(src)
        return out


def _check_cond(source, cond, schedule) -> None:
    """A clear error when the conditioning or schedule does not fit the source's family."""
    if source.family is WAN:
        if not isinstance(cond, WanConditioning):
            raise ValueError(f"a Wan model is calibrated on a WanConditioning (text tokens, and for I2V the CLIP "
                             f"image tokens and concatenated channels), got {type(cond).__name__}")
    else:
        if not isinstance(cond, Conditioning):
            raise ValueError(f"a {source.family.title} model is calibrated on a Conditioning, got "
                             f"{type(cond).__name__}")
        if schedule is not None:
            raise ValueError("a Wan schedule (shift, sigma range, experts) was given for a HunyuanVideo model; "
                             "leave wan_schedule unset")


def job_data(cond, latent_shape, n_samples, steps, seed, source=None, schedule=None) -> dict:
    """What identifies the calibration data (the header's calibration.data, as pipeline.compress).
    Wan: the prompt hash covers text, CLIP and concatenated tensors; shift, sigma range and the experts'
    weights (fingerprints) are part of it."""
    if isinstance(cond, WanConditioning):
        schedule = schedule or WanSchedule()
        data = {"n_samples": n_samples, "steps": steps, "seed": seed, "latent": list(latent_shape[-4:]),
                "prompt": state_dict_hash({k: v for k, v in (("context", cond.context), ("clip_fea", cond.clip_fea),
                                                             ("concat", cond.concat)) if v is not None}),
                "shift": schedule.shift,
                "sigma_range": None if schedule.sigma_range is None else list(schedule.sigma_range)}
        if schedule.expert is not None:
            data["experts"] = [s.fingerprint() for s in schedule.expert_sources(source, steps)[1:]]
        return data
    return hunyuan_job_data(cond, latent_shape, n_samples, steps, seed)


def _wan_runner(model, source, cond, latent_shape, steps, seed, n_traj, on_step, schedule, device):
    """Wan trajectories; other experts are streamed models of their own sources, built when first used."""
    schedule = schedule or WanSchedule()
    models = {id(source): model}

    def expert(sigma):
        src = schedule.expert(sigma)
        if id(src) not in models:
            models[id(src)] = streamed_dit(src, device)
        return models[id(src)]
    return wan_trajectory_runner(model, cond, latent_shape, flow_sigmas(steps, schedule.shift), seed, n_traj,
                                 on_step, expert if schedule.expert is not None else None)


def capture_to(folder: Path, source, cond, latent_shape, n_samples, steps, seed, device, store_dtype,
               per_trajectory=SAMPLES_PER_TRAJECTORY, on_step=None, wan_schedule=None) -> Capture:
    """The job's captured block-0 inputs: reused from `folder` when complete, else captured there.
    latent_shape: the noisy latent [C, T, H, W] (Wan I2V: without the concatenated channels)."""
    if (folder / "capture.index.json").exists() and (folder / "capture.meta.json").exists():
        return Capture.open(folder, pin=True)
    model = streamed_dit(source, device)
    n_traj = n_trajectories(n_samples, per_trajectory)
    picks = None
    if source.family is WAN:
        run = _wan_runner(model, source, cond, latent_shape, steps, seed, n_traj, on_step, wan_schedule, device)
        picks = (wan_schedule or WanSchedule()).picks(n_samples, steps)
    else:
        run = trajectory_runner(model, cond, latent_shape, steps, seed, n_traj, on_step)
    store = TensorStore(folder / "capture.bin")
    cap = capture_first_block(model, run, n_samples, steps, per_trajectory, store, store_dtype, picks)
    cap.save_meta(folder / "capture.meta.json")
    store.finish(folder / "capture.index.json")  # the index is the completion marker: written last
    store.close()
    del model
    return Capture.open(folder, pin=True)


def compress_streaming(source, cond: Conditioning, latent_shape, out_path, settings, *, n_samples: int = 20,
                       steps: int = 20, seed: int = 0, device="cpu", propagation: str = "fp", amp: bool = False,
                       store_dtype=None, host_budget: Optional[int] = None, gpu_budget: Optional[int] = None,
                       progress: Optional[Callable] = None, capture_progress: Optional[Callable] = None,
                       source_hash: Optional[str] = None, wan_schedule: Optional[WanSchedule] = None):
    """Calibrate and save without ever holding the model. Returns (policy, report).

    source: a BlockSource (block_source.py) of HunyuanVideo (cond: a Conditioning) or Wan (cond: a
    WanConditioning; latent_shape the noisy latent; wan_schedule: shift, sigma range, experts, default
    WanSchedule()). capture_progress(trajectory, n_trajectories, step) and
    progress(block, n_blocks, epoch, loss) may raise to stop; the next call with the same arguments
    resumes. Refuses, before any work, a job whose estimate exceeds gpu_budget bytes or the free disk;
    host_budget (bytes) decides when one block's data go to disk instead of RAM.
    """
    from .streaming import PROPAGATIONS
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation {propagation!r} unknown; choose one of {PROPAGATIONS}")
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"output name must end in .safetensors, got {out_path.name!r}")
    _check_cond(source, cond, wan_schedule)
    check_calibration_latent(source.skeleton, model_latent_shape(cond, latent_shape))
    if n_samples < 1 or steps < 1:
        raise ValueError("samples and steps must be at least 1")
    if source.family is WAN:
        (wan_schedule or WanSchedule()).picks(n_samples, steps)   # refuses an empty sigma range before any work
    est = estimate(source.config, latent_shape, cond.context.shape[1], n_samples, steps, settings,
                   store_dtype or source.dtype, propagation)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_fits(est, gpu_budget)
    source_hash = source_hash or source.fingerprint()
    data = job_data(cond, latent_shape, n_samples, steps, seed, source, wan_schedule)
    extra = dict(data)
    if propagation != "fp" or amp or (store_dtype not in (None, source.dtype)):
        extra["stream"] = {"propagation": propagation, "amp": amp, "store_dtype": str(store_dtype)}
    partial = resume_folder(out_path, source_hash, settings, extra)
    # disk: counted once the partial folder is known, so a resumed job is credited with what it already wrote
    output = storage_bytes(source.skeleton, default_policy(source.skeleton, settings.w_bits, settings.a_bits))["total"]
    held = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.exists() else 0
    check_fits(est, None, shutil.disk_usage(out_path.parent).free, output_bytes=output, on_disk=held)
    partial.mkdir(parents=True, exist_ok=True)
    cap = capture_to(partial, source, cond, latent_shape, n_samples, steps, seed, device,
                     store_dtype or source.dtype, on_step=capture_progress, wan_schedule=wan_schedule)
    # host_budget covers capture + one block's data: what is left after the capture may stay in RAM
    per_block = None if host_budget is None else max(0, host_budget - est["host_capture_bytes"])
    policy, report, parts = calibrate_streaming(source, cap, settings, device=device, workdir=partial,
                                                propagation=propagation, amp=amp, store_dtype=store_dtype,
                                                host_budget=per_block, progress=progress)
    calibration = {"settings": asdict(settings), "data": data, "final_losses": report}
    if "stream" in extra:
        calibration["stream"] = extra["stream"]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    assemble(source, policy, settings, parts, out_path, calibration, source_hash)
    cap.store.close()
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.parent.rmdir()  # only if no other job is pending
    except OSError:
        pass
    return policy, report

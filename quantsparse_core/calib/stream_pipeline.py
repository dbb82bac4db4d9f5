"""The Calibrate node's job, streaming: capture block-0 inputs with a block-streaming model, calibrate
block by block from a BlockSource, assemble the compressed file. Needs no ComfyUI (tested here).

Resume: everything of one job (same output, weights, settings and data) lives in one partial folder:
the capture (written once, then reused), and each finished block's parts. A new run with the same
inputs reuses the capture, replays the finished blocks and writes the same file.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional


from .capture import check_calibration_latent, n_trajectories
from .pipeline import SAMPLES_PER_TRAJECTORY, Conditioning, resume_folder, state_dict_hash
from .stream_budget import check_fits, estimate
from .stream_capture import Capture, capture_first_block, streamed_dit, trajectory_runner
from .streaming import assemble, calibrate_streaming
from .tensor_store import TensorStore


def job_data(cond: Conditioning, latent_shape, n_samples, steps, seed) -> dict:
    """What identifies the calibration data (the header's calibration.data, as pipeline.compress)."""
    return {"n_samples": n_samples, "steps": steps, "seed": seed, "latent": list(latent_shape[-4:]),
            "prompt": state_dict_hash({k: v for k, v in (("context", cond.context), ("pooled", cond.pooled),
                                                         ("mask", cond.mask)) if v is not None}),
            "guidance": cond.guidance}


def capture_to(folder: Path, source, cond, latent_shape, n_samples, steps, seed, device, store_dtype,
               per_trajectory=SAMPLES_PER_TRAJECTORY, on_step=None) -> Capture:
    """The job's captured block-0 inputs: reused from `folder` when complete, else captured there."""
    if (folder / "capture.index.json").exists() and (folder / "capture.meta.json").exists():
        return Capture.open(folder, pin=True)
    model = streamed_dit(source, device)
    n_traj = n_trajectories(n_samples, per_trajectory)
    run = trajectory_runner(model, cond, latent_shape, steps, seed, n_traj, on_step)
    store = TensorStore(folder / "capture.bin")
    cap = capture_first_block(model, run, n_samples, steps, per_trajectory, store, store_dtype)
    cap.save_meta(folder / "capture.meta.json")
    store.finish(folder / "capture.index.json")  # the index is the completion marker: written last
    store.close()
    del model
    return Capture.open(folder, pin=True)


def compress_streaming(source, cond: Conditioning, latent_shape, out_path, settings, *, n_samples: int = 20,
                       steps: int = 20, seed: int = 0, device="cpu", propagation: str = "fp", amp: bool = False,
                       store_dtype=None, host_budget: Optional[int] = None, gpu_budget: Optional[int] = None,
                       progress: Optional[Callable] = None, capture_progress: Optional[Callable] = None,
                       source_hash: Optional[str] = None):
    """Calibrate and save without ever holding the model. Returns (policy, report).

    source: a BlockSource (block_source.py). capture_progress(trajectory, n_trajectories, step) and
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
    check_calibration_latent(source.skeleton, latent_shape)
    if n_samples < 1 or steps < 1:
        raise ValueError("samples and steps must be at least 1")
    est = estimate(source.config, latent_shape, cond.context.shape[1], n_samples, steps, settings,
                   store_dtype or source.dtype, propagation)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    check_fits(est, gpu_budget, shutil.disk_usage(out_path.parent).free)
    source_hash = source_hash or source.fingerprint()
    data = job_data(cond, latent_shape, n_samples, steps, seed)
    extra = dict(data)
    if propagation != "fp" or amp or (store_dtype not in (None, source.dtype)):
        extra["stream"] = {"propagation": propagation, "amp": amp, "store_dtype": str(store_dtype)}
    partial = resume_folder(out_path, source_hash, settings, extra)
    partial.mkdir(parents=True, exist_ok=True)
    cap = capture_to(partial, source, cond, latent_shape, n_samples, steps, seed, device,
                     store_dtype or source.dtype, on_step=capture_progress)
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

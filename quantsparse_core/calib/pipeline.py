"""Compress a HunyuanVideo state dict end to end: capture block inputs along sampling trajectories
of the user's own conditioning, calibrate block by block, save the compressed checkpoint.

This is what the "QuantSparse Calibrate" node runs; it needs no ComfyUI, so it is tested here and
the node stays a thin adapter. Interrupted runs resume from the last finished block, because the
per-block results live in a folder named after the output, the source weights and the settings.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..io.checkpoint import save_compressed
from ..models.config import config_from_state_dict, require_calibratable
from ..models.hunyuan_video import HunyuanVideoDiT
from ..models.weights import check_state_dict
from ..quant.policy import default_policy
from .calibrate import CalibSettings, calibrate, pin_captured
from .capture import capture_trajectories, check_calibration_latent, n_trajectories
from .stream_capture import trajectory_runner


SAMPLES_PER_TRAJECTORY = 4  # calibration samples taken from each sampling run


@dataclass
class Conditioning:
    """One prompt as the DiT consumes it: context [1, Lt, C], pooled [1, 768] or None, text mask
    [1, Lt] (1 = real token) or None, embedded guidance; concat: the image latent + mask channels appended to
    the noisy latent at every call (1.0 I2V: [1, 17, T, H, W]; 1.5: [1, 33, T, H, W]; None for 1.0 T2V);
    tokens: HunyuanVideo 1.5's other token inputs as the DiT takes them ({"txt_byt5": [1, Lb, 1472],
    "clip_fea": [1, Lv, 1152]}, each optional)."""
    context: torch.Tensor
    pooled: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    guidance: float = 6.0
    concat: Optional[torch.Tensor] = None
    tokens: Optional[dict] = None


def model_latent_shape(cond: Conditioning, latent_shape) -> tuple:
    """The latent [C, T, H, W] the DiT reads: the noisy latent's, plus image-to-video's concatenated channels
    (a Conditioning or a WanConditioning)."""
    shape = tuple(latent_shape)[-4:]
    return shape if cond.concat is None else (shape[0] + cond.concat.shape[1], *shape[1:])


def job_data(cond: Conditioning, latent_shape, n_samples: int, steps: int, seed: int) -> dict:
    """What identifies a HunyuanVideo calibration's data (the header's calibration.data; part of the resume key):
    the sampling plan and a hash of every conditioning tensor."""
    tensors = {k: v for k, v in (("context", cond.context), ("pooled", cond.pooled), ("mask", cond.mask),
                                 ("concat", cond.concat), *sorted((cond.tokens or {}).items())) if v is not None}
    return {"n_samples": n_samples, "steps": steps, "seed": seed, "latent": list(latent_shape[-4:]),
            "prompt": state_dict_hash(tensors), "guidance": cond.guidance}


def state_dict_hash(sd: dict) -> str:
    """sha256 over key names, shapes, dtypes and bytes, in sorted key order: identifies the source
    weights in the checkpoint header and keys the resume folder."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.numel():  # hashed in place (no bytes copy of a 25 GB model); reshape also covers 0-dim tensors
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def check_memory(sd: dict, device, dtype=torch.float32, headroom: float = 1.25) -> None:
    """Refuse, before any work, a calibration whose float32 model cannot fit on a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    need = headroom * sum(t.numel() for t in sd.values()) * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    if need > free:
        raise MemoryError(f"calibrating this model needs about {need / 2**30:.1f} GB of GPU memory "
                          f"({dtype} weights plus activations) but {free / 2**30:.1f} GB are free on {device}: "
                          "free VRAM (close other models or programs) or calibrate on a larger GPU")


def dit_from_state_dict(sd: dict, device="cpu", dtype=torch.float32) -> HunyuanVideoDiT:
    """Our HunyuanVideoDiT with the given ComfyUI-format weights (ValueError if they are not HunyuanVideo's)."""
    model = HunyuanVideoDiT(require_calibratable(config_from_state_dict(sd)), device="meta")
    check_state_dict(model, sd)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def capture_conditioned(model, cond: Conditioning, latent_shape, n_samples: int = 20, steps: int = 20,
                        per_trajectory: int = SAMPLES_PER_TRAJECTORY, seed: int = 0, device="cpu",
                        on_step: Optional[Callable[[int, int, int], None]] = None) -> dict:
    """Block inputs at `n_samples` steps spread over the whole schedule, from trajectories of the
    user's prompt with seeds seed, seed+1, ... (per_trajectory captured steps each).
    on_step(trajectory, n_trajectories, step) reports progress (and may raise to stop)."""
    check_calibration_latent(model, model_latent_shape(cond, latent_shape))
    if n_samples < 1 or steps < 1 or per_trajectory < 1:
        raise ValueError("samples, steps and samples per trajectory must all be at least 1")
    run = trajectory_runner(model, cond, latent_shape, steps, seed, n_trajectories(n_samples, per_trajectory), on_step)
    return capture_trajectories(model, run, n_samples, steps, per_trajectory, device)


def resume_folder(out_path: Path, source_hash: str, settings: CalibSettings, extra: dict) -> Path:
    """Where per-block results of this exact job live (same output, weights, settings, data)."""
    key = hashlib.sha256(json.dumps([source_hash, asdict(settings), extra], sort_keys=True).encode()).hexdigest()[:16]
    return out_path.parent / ".quantsparse-partial" / f"{out_path.stem}-{key}"


def compress(sd: dict, cond: Conditioning, latent_shape, out_path, settings: CalibSettings, *,
             n_samples: int = 20, steps: int = 20, seed: int = 0, device="cpu",
             progress: Optional[Callable] = None, capture_progress: Optional[Callable] = None):
    """Calibrate and save. Returns (the compressed model, its policy, the calibration report).

    `capture_progress(trajectory, n_trajectories, step)` is called while block inputs are captured and
    `progress(block, n_blocks, epoch, loss)` during calibration; either may raise to stop the job:
    finished blocks are kept and the next call with the same arguments resumes after them.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"output name must end in .safetensors, got {out_path.name!r}")
    check_memory(sd, device)
    source_hash = state_dict_hash(sd)
    model = dit_from_state_dict(sd, device=device)
    check_calibration_latent(model, model_latent_shape(cond, latent_shape))
    data = job_data(cond, latent_shape, n_samples, steps, seed)
    partial = resume_folder(out_path, source_hash, settings, data)
    # Block inputs go to host memory as they are captured; then the model leaves the accelerator and
    # calibration moves one block at a time onto it (calibrate(device=...)).
    captured = capture_conditioned(model, cond, latent_shape, n_samples, steps, seed=seed, device="cpu",
                                   on_step=capture_progress)
    if torch.device(device).type == "cuda":
        pin_captured(captured)
    model.to("cpu")
    policy = default_policy(model, settings.w_bits, settings.a_bits)
    report = calibrate(model, captured, settings, policy, checkpoint_dir=partial, progress=progress, device=device)
    calibration = {"settings": asdict(settings), "data": data, "final_losses": report}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_compressed(model, out_path, policy, calibration=calibration, source_hash=source_hash)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.parent.rmdir()  # only if no other job is pending
    except OSError:
        pass
    return model, policy, report

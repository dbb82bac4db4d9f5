"""Loading and saving DiT weights in ComfyUI's key format, with errors that say what is wrong."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DiTConfig, config_from_state_dict
from .hunyuan_video import HunyuanVideoDiT


def check_state_dict(model: torch.nn.Module, sd: dict) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys (nothing is loaded)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected keys (e.g. {extra[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
    if problems:
        raise ValueError("state dict does not match this HunyuanVideo architecture: " + "; ".join(problems)
                         + ". Check that the file is a HunyuanVideo transformer in ComfyUI's key format "
                         "and that the config matches it.")


def strip_prefix(sd: dict) -> dict:
    """Accept full ComfyUI checkpoints whose transformer keys start with 'model.diffusion_model.'."""
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_dit(path, device="cpu", dtype=torch.float32, config: DiTConfig | None = None):
    """Build a HunyuanVideoDiT from a safetensors file; the config is read from the keys if not given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weights file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-download or re-create it") from e
    sd = strip_prefix(sd)
    config = config or config_from_state_dict(sd)
    model = HunyuanVideoDiT(config, device="meta")
    check_state_dict(model, sd)
    model = HunyuanVideoDiT(config, device=device, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.eval(), meta


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

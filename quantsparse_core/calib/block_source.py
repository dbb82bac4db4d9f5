"""Where a block's full-precision weights come from, one block at a time.

Streaming calibration never builds the whole model: it asks a BlockSource for block i, gets a
fresh module on the device it wants, and drops it when done. The weights stay where their owner
keeps them (a state dict or live module on the CPU, ComfyUI's offloaded MODEL, or a safetensors
file read lazily); only the requested block is copied.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from ..models import HunyuanVideoDiT, config_from_state_dict
from ..models.config import require_calibratable

PREFIXES = {"double": "double_blocks.", "single": "single_blocks."}


def block_names(config) -> list:
    """[(kind, index)] in execution order."""
    return [("double", i) for i in range(config.depth_double)] + [("single", i) for i in range(config.depth_single)]


class BlockSource:
    """Base class: subclasses give `config`, `tensors(kind, idx)` (block-relative keys) and `other_tensors()`."""

    config = None

    def __init__(self):
        self.skeleton = HunyuanVideoDiT(self.config, device="meta")  # shapes only, no memory

    def names(self) -> list:
        return block_names(self.config)

    def tensors(self, kind: str, idx: int) -> dict:
        raise NotImplementedError

    def other_tensors(self) -> dict:
        """Every weight outside the double/single blocks (embedders, token refiner, final layer)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in (the first block's first tensor)."""
        kind, idx = self.names()[0]
        return next(iter(self.tensors(kind, idx).values())).dtype

    def skeleton_block(self, kind: str, idx: int) -> torch.nn.Module:
        """Block (kind, idx) of the meta skeleton: its shapes and key names, no memory."""
        return (self.skeleton.double_blocks if kind == "double" else self.skeleton.single_blocks)[idx]

    def tensors_on(self, kind: str, idx: int, device, dtype=None) -> dict:
        """Block (kind, idx)'s tensors as fresh copies on `device` (in `dtype`, default: as held)."""
        return {k: v.to(device=device, dtype=dtype or v.dtype, copy=True) for k, v in self.tensors(kind, idx).items()}

    def block(self, kind: str, idx: int, device, dtype=None) -> torch.nn.Module:
        """A fresh copy of block (kind, idx) on `device` (in `dtype`, default: as held), no grads."""
        blk = copy.deepcopy(self.skeleton_block(kind, idx))
        blk.load_state_dict(self.tensors_on(kind, idx, device, dtype), strict=True, assign=True)
        return blk.requires_grad_(False).eval()

    def fingerprint(self) -> str:
        """sha256 over names, shapes, dtypes and bytes in sorted key order, reading one block at a
        time (equals pipeline.state_dict_hash of the full state dict; sorted keys keep each block's
        keys together, so a one-block cache suffices)."""
        h = hashlib.sha256()
        other = self.other_tensors()
        owner = {k: None for k in other}
        for kind, idx in self.names():
            for k in self._block_keys(kind, idx):
                owner[f"{PREFIXES[kind]}{idx}.{k}"] = (kind, idx)
        cached, cache = None, {}
        for key in sorted(owner):
            blk = owner[key]
            if blk is None:
                t = other[key]
            else:
                if blk != cached:
                    cached, cache = blk, self.tensors(*blk)
                t = cache[key[len(f"{PREFIXES[blk[0]]}{blk[1]}."):]]
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def _block_keys(self, kind, idx) -> list:
        return list(self.skeleton_block(kind, idx).state_dict().keys())


class StateDictSource(BlockSource):
    """Weights in a ComfyUI-format state dict (or a live module's state_dict(): no copy is made)."""

    def __init__(self, sd: dict):
        self.sd = sd
        self.config = require_calibratable(config_from_state_dict(sd))
        super().__init__()
        from ..models.weights import check_state_dict
        check_state_dict(self.skeleton, sd)
        self._by_block = {}
        for k in sd:
            for kind, prefix in PREFIXES.items():
                if k.startswith(prefix):
                    idx, rest = k[len(prefix):].split(".", 1)
                    self._by_block.setdefault((kind, int(idx)), {})[rest] = k

    def tensors(self, kind, idx) -> dict:
        return {rest: self.sd[k] for rest, k in self._by_block[(kind, idx)].items()}

    def other_tensors(self) -> dict:
        return {k: v for k, v in self.sd.items() if not k.startswith(tuple(PREFIXES.values()))}


def module_source(model: torch.nn.Module) -> StateDictSource:
    """A live HunyuanVideo module (ours or ComfyUI's diffusion_model) as a source; shares its storage."""
    return StateDictSource(model.state_dict())


class SafetensorsSource(BlockSource):
    """A ComfyUI-format .safetensors file, read block by block (nothing else stays in memory)."""

    PREFIX = "model.diffusion_model."

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such weights file: {self.path}")
        with safe_open(str(self.path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        self.strip = self.PREFIX if any(k.startswith(self.PREFIX) for k in keys) else ""
        self.keys = {k[len(self.strip):]: k for k in keys if k.startswith(self.strip)}
        metas = {k: torch.empty(shapes[full], device="meta") for k, full in self.keys.items()}
        self.config = require_calibratable(config_from_state_dict(metas))
        super().__init__()

    def _read(self, names: list) -> dict:
        with safe_open(str(self.path), framework="pt") as f:
            return {n: f.get_tensor(self.keys[n]) for n in names}

    def tensors(self, kind, idx) -> dict:
        prefix = f"{PREFIXES[kind]}{idx}."
        got = self._read([k for k in self.keys if k.startswith(prefix)])
        return {k[len(prefix):]: v for k, v in got.items()}

    def other_tensors(self) -> dict:
        return self._read([k for k in self.keys if not k.startswith(tuple(PREFIXES.values()))])

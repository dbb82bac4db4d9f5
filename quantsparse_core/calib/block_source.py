"""Where a block's full-precision weights come from, one block at a time.

Streaming calibration never builds the whole model: it asks a BlockSource for block i, gets a
fresh module on the device it wants, and drops it when done. The weights stay where their owner
keeps them (a state dict or live module on the CPU, ComfyUI's offloaded MODEL, or a safetensors
file read lazily); only the requested block is copied.

Both families (models/family.py): HunyuanVideo's blocks are (kind "double" | "single", index) under
"double_blocks." / "single_blocks.", Wan's are (kind "wan", index) under "blocks." (capture.block_name).
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from ..models import config_from_state_dict
from ..models.config import require_calibratable
from ..models.family import WAN, family_of
from .capture import WAN_KIND, block_name

PREFIXES = {"double": "double_blocks.", "single": "single_blocks."}   # HunyuanVideo
WAN_PREFIXES = {WAN_KIND: "blocks."}


def block_prefixes(config) -> dict:
    """{kind: state-dict prefix of that kind's blocks} of the config's family."""
    return WAN_PREFIXES if family_of(config) is WAN else PREFIXES


def block_names(config) -> list:
    """[(kind, index)] in execution order."""
    if family_of(config) is WAN:
        return [(WAN_KIND, i) for i in range(config.num_layers)]
    return [("double", i) for i in range(config.depth_double)] + [("single", i) for i in range(config.depth_single)]


def _config_of(sd: dict):
    """The calibratable config of a ComfyUI-format state dict (or of shape-only metas) of either family."""
    if "head.modulation" in sd:   # Wan (models/family.family_of_state_dict's rule); the reader checks every key
        from ..io.checkpoint import require_loadable
        config = WAN.config_from_state_dict(sd)
        require_loadable(config)  # Fun / VACE-like variants are refused before any work
        return config
    return require_calibratable(config_from_state_dict(sd))


class BlockSource:
    """Base class: subclasses give `config`, `tensors(kind, idx)` (block-relative keys) and `other_tensors()`."""

    config = None

    def __init__(self):
        self.family = family_of(self.config)
        self.prefixes = block_prefixes(self.config)
        self.skeleton = self.family.build(self.config, device="meta")  # shapes only, no memory

    def names(self) -> list:
        return block_names(self.config)

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state the blocks pass on (HunyuanVideo hidden_size, Wan dim)."""
        return self.config.dim if self.family is WAN else self.config.hidden_size

    def count(self, kind: str) -> int:
        """How many blocks of `kind` the model has (the AttentionCall's block count)."""
        if self.family is WAN:
            return self.config.num_layers
        return {"double": self.config.depth_double, "single": self.config.depth_single}[kind]

    def block_prefix(self, kind: str, idx: int) -> str:
        """The state-dict prefix of block (kind, idx), e.g. 'double_blocks.3.' or 'blocks.7.'."""
        return block_name(kind, idx) + "."

    def tensors(self, kind: str, idx: int) -> dict:
        raise NotImplementedError

    def other_tensors(self) -> dict:
        """Every weight outside the blocks (embedders, token refiner or time projection, final layer)."""
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are held in (the first block's first tensor)."""
        kind, idx = self.names()[0]
        return next(iter(self.tensors(kind, idx).values())).dtype

    def skeleton_block(self, kind: str, idx: int) -> torch.nn.Module:
        """Block (kind, idx) of the meta skeleton: its shapes and key names, no memory."""
        if self.family is WAN:
            return self.skeleton.blocks[idx]
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
                owner[f"{self.prefixes[kind]}{idx}.{k}"] = (kind, idx)
        cached, cache = None, {}
        for key in sorted(owner):
            blk = owner[key]
            if blk is None:
                t = other[key]
            else:
                if blk != cached:
                    self.on_block_read()  # a host (ComfyUI) stops a long fingerprint here on Cancel
                    cached, cache = blk, self.tensors(*blk)
                t = cache[key[len(f"{self.prefixes[blk[0]]}{blk[1]}."):]]
            t = t.detach().cpu().contiguous()
            h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def _block_keys(self, kind, idx) -> list:
        return list(self.skeleton_block(kind, idx).state_dict().keys())

    def on_block_read(self) -> None:
        """Called before each block's weights are read for the fingerprint; a subclass may raise to stop."""


class StateDictSource(BlockSource):
    """Weights in a ComfyUI-format state dict (or a live module's state_dict(): no copy is made), of
    HunyuanVideo or Wan (told apart by their keys)."""

    def __init__(self, sd: dict):
        self.sd = sd
        self.config = _config_of(sd)
        super().__init__()
        if self.family is not WAN:   # Wan's reader has checked every key and shape already
            from ..models.weights import check_state_dict
            check_state_dict(self.skeleton, sd)
        self._by_block = {}
        for k in sd:
            for kind, prefix in self.prefixes.items():
                if k.startswith(prefix):
                    idx, rest = k[len(prefix):].split(".", 1)
                    self._by_block.setdefault((kind, int(idx)), {})[rest] = k

    def tensors(self, kind, idx) -> dict:
        return {rest: self.sd[k] for rest, k in self._by_block[(kind, idx)].items()}

    def other_tensors(self) -> dict:
        return {k: v for k, v in self.sd.items() if not k.startswith(tuple(self.prefixes.values()))}


def module_source(model: torch.nn.Module) -> StateDictSource:
    """A live HunyuanVideo or Wan module (ours or ComfyUI's diffusion_model) as a source; shares its storage."""
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
        self.config = _config_of(metas)
        super().__init__()

    def _read(self, names: list) -> dict:
        with safe_open(str(self.path), framework="pt") as f:
            return {n: f.get_tensor(self.keys[n]) for n in names}

    def tensors(self, kind, idx) -> dict:
        prefix = f"{self.prefixes[kind]}{idx}."
        got = self._read([k for k in self.keys if k.startswith(prefix)])
        return {k[len(prefix):]: v for k, v in got.items()}

    def other_tensors(self) -> dict:
        return self._read([k for k in self.keys if not k.startswith(tuple(self.prefixes.values()))])

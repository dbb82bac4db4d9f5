"""Model configuration and named presets.

The fields mirror what ComfyUI derives from a HunyuanVideo state dict, so a config can be
read back from any checkpoint in ComfyUI's key format (`config_from_state_dict`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

HEAD_DIM = 128            # ComfyUI derives heads = hidden / 128 for HunyuanVideo
ROPE_AXES = (16, 56, 56)  # rotary split over (frame, row, column)
POOLED_DIM = 768          # ComfyUI fixes the pooled-text width (CLIP-L) for HunyuanVideo


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int = 3072
    num_heads: int = 24
    depth_double: int = 20
    depth_single: int = 40
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple = (1, 2, 2)
    context_in_dim: int = 4096
    vec_in_dim: int | None = POOLED_DIM
    guidance_embed: bool = True
    rope_axes: tuple = ROPE_AXES
    rope_theta: int = 256
    refiner_blocks: int = 2

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {self.rope_axes} must sum to head_dim {self.head_dim}")
        if any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["rope_axes"] = list(self.rope_axes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; this file was written by a newer or "
                             "different tool")
        d = dict(d)
        for k in ("patch_size", "rope_axes"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


PRESETS: dict[str, DiTConfig] = {
    # The real HunyuanVideo-13B text-to-video transformer.
    "hunyuan-video-13b": DiTConfig(),
    # The embedded tiny model: same architecture, 2 heads of 128.
    "tiny": DiTConfig(hidden_size=256, num_heads=2, depth_double=2, depth_single=2, context_in_dim=64),
    # Smallest useful shape for unit tests (random weights).
    "test": DiTConfig(hidden_size=256, num_heads=2, depth_double=1, depth_single=1, context_in_dim=32),
}


def get_preset(name: str) -> DiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _count_blocks(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(idx)}")
    return len(idx)


def config_from_state_dict(sd) -> DiTConfig:
    """Read the architecture from a ComfyUI-format HunyuanVideo state dict (or a dict of shapes).

    Raises a ValueError naming the problem when the keys are not HunyuanVideo's.
    """
    shape = lambda k: tuple(sd[k].shape)  # noqa: E731
    required = ["img_in.proj.weight", "final_layer.linear.weight", "txt_in.input_embedder.weight",
                "txt_in.individual_token_refiner.blocks.0.norm1.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError("this is not a HunyuanVideo transformer state dict (missing "
                         f"{missing[:3]}); QuantSparse needs HunyuanVideo weights in ComfyUI's key format")
    in_w = shape("img_in.proj.weight")
    if len(in_w) != 5:
        raise ValueError(f"img_in.proj.weight has shape {in_w}; expected a 3-D patch embedding "
                         "(HunyuanVideo video model, not the image variant)")
    hidden, in_ch, patch = in_w[0], in_w[1], tuple(in_w[2:])
    if hidden % HEAD_DIM:
        raise ValueError(f"hidden size {hidden} is not a multiple of {HEAD_DIM}")
    out_ch = shape("final_layer.linear.weight")[0] // math.prod(patch)
    keys = list(sd.keys())
    if any(k.startswith(("byt5_in.", "time_r_in.", "vision_in.", "cond_type_embedding")) for k in keys):
        raise ValueError("this is a HunyuanVideo 1.5 checkpoint; QuantSparse supports HunyuanVideo (1.0) "
                         "text-to-video transformers")
    mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0] if "double_blocks.0.img_mlp.0.weight" in sd \
        else shape("single_blocks.0.linear2.weight")[1] - hidden
    return DiTConfig(
        hidden_size=hidden, num_heads=hidden // HEAD_DIM,
        depth_double=_count_blocks(keys, "double_blocks."),
        depth_single=_count_blocks(keys, "single_blocks."),
        mlp_ratio=mlp_hidden / hidden, in_channels=in_ch, out_channels=out_ch, patch_size=patch,
        context_in_dim=shape("txt_in.input_embedder.weight")[1],
        vec_in_dim=shape("vector_in.in_layer.weight")[1] if "vector_in.in_layer.weight" in sd else None,
        guidance_embed=any(k.startswith("guidance_in.") for k in keys),
        refiner_blocks=_count_blocks(keys, "txt_in.individual_token_refiner.blocks."),
    )

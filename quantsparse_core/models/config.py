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

T2V, I2V, V15, V15_SR = ("HunyuanVideo 1.0 T2V", "HunyuanVideo 1.0 I2V", "HunyuanVideo 1.5",
                         "HunyuanVideo 1.5 super-resolution")
# comfy/supported_models.py: the 1.0 family differs only in img_in's input channels.
V10_BY_CHANNELS = {16: T2V, 33: I2V, 32: "SkyReels I2V"}
# Config fields that only HunyuanVideo 1.5-style models set (to_dict leaves them out at their defaults).
V15_FIELDS = ("byt5_in_dim", "byt5_hidden", "vision_in_dim", "cond_type_embedding", "meanflow")


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
    # HunyuanVideo 1.5 additions (None/False = absent, as in 1.0). ComfyUI reads each from its key.
    byt5_in_dim: int | None = None    # ByT5 glyph-token width (byt5_in.fc1 input)
    byt5_hidden: int = 2048           # byt5_in's inner width (fc1/fc2 outputs; ComfyUI fixes 2048)
    vision_in_dim: int | None = None  # image-encoder token width (vision_in.proj.0)
    cond_type_embedding: bool = False  # learned type vector per token kind (text / byT5 / image)
    meanflow: bool = False            # time_r_in: second timestep embedding (distilled models)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {self.rope_axes} must sum to head_dim {self.head_dim}")
        if any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even")
        if (self.byt5_in_dim or self.vision_in_dim) and not self.cond_type_embedding:
            raise ValueError("byT5 or image-token inputs without cond_type_embedding are not a HunyuanVideo 1.5 "
                             "configuration (HunyuanImage 2.1 orders those tokens differently); unsupported")

    @property
    def variant(self) -> str:
        """Which HunyuanVideo-family model this architecture is, by ComfyUI's rules (supported_models.py)."""
        if self.vision_in_dim or self.cond_type_embedding:
            return V15_SR if self.in_channels == 98 else V15
        if tuple(self.patch_size) == (1, 1, 1) and self.vec_in_dim is None:
            return "HunyuanImage 2.1 refiner"
        if tuple(self.patch_size) == (1, 2, 2) and self.vec_in_dim and not (self.byt5_in_dim or self.meanflow):
            name = V10_BY_CHANNELS.get(self.in_channels)
            if name is not None:
                return name
        return f"an unknown HunyuanVideo configuration (in_channels {self.in_channels}, patch {self.patch_size})"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        """JSON-ready fields. The 1.5 fields are left out while at their defaults, so a 1.0 model's dict (and
        every checkpoint header written for it) is what it was before they existed and older readers keep
        reading it; they reject 1.5 dicts as unknown fields, which they are to them."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in V15_FIELDS and d[f.name] == f.default:
                del d[f.name]
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
    # HunyuanVideo 1.0 image-to-video (ComfyUI's hunyuan_video_image_to_video_720p): the 13B shapes with
    # in_channels 33 = 16 noisy latent + 16 image latent + 1 mask (supported_models.HunyuanVideoI2V,
    # model_base.HunyuanVideoI2V concat_keys). No guidance embedding: the I2V model runs real CFG
    # (diffusers' HunyuanVideo I2V transformer: guidance_embeds=False); a file's keys decide in the end.
    "hunyuan-video-i2v-13b": DiTConfig(in_channels=33, guidance_embed=False),
    # HunyuanVideo 1.5 (8.3B), T2V and I2V share it: 54 double blocks of 2048 = 16 x 128, no single blocks,
    # patch 1 on a 32-channel latent with in_channels 65 = 32 + 32 image latent + 1 mask (T2V feeds zeros;
    # model_base.HunyuanVideo15.concat_cond), Qwen2.5-VL-7B text (3584), no pooled text (no vector_in), no
    # guidance embedding, ByT5 glyph tokens (1472 -> 2048 -> 2048 -> hidden: ComfyUI's ByT5Mapper),
    # SigLIP image tokens (1152: supported_models.HunyuanVideo15 vision_in_dim). Widths, depth, channels,
    # patch and text width: diffusers' HunyuanVideo15Transformer3DModel defaults, which ComfyUI's detection
    # reads back from the keys (model_detection.detect_unet_config); the rest are ComfyUI's fixed values.
    "hunyuan-video-1.5-8b": DiTConfig(
        hidden_size=2048, num_heads=16, depth_double=54, depth_single=0, in_channels=65, out_channels=32,
        patch_size=(1, 1, 1), context_in_dim=3584, vec_in_dim=None, guidance_embed=False,
        byt5_in_dim=1472, vision_in_dim=1152, cond_type_embedding=True),
    # Small random-weight shapes of each variant for tests. ByT5 and image widths stay at ComfyUI's fixed
    # 1472 / 2048 and HunyuanVideo15's 1152 so that ComfyUI's detection names the model.
    "test-i2v": DiTConfig(hidden_size=256, num_heads=2, depth_double=1, depth_single=1, context_in_dim=32,
                          in_channels=33, guidance_embed=False),
    "test-1.5": DiTConfig(hidden_size=256, num_heads=2, depth_double=2, depth_single=0, in_channels=65,
                          out_channels=32, patch_size=(1, 1, 1), context_in_dim=32, vec_in_dim=None,
                          guidance_embed=False, byt5_in_dim=1472, vision_in_dim=1152, cond_type_embedding=True),
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


def require_calibratable(config: DiTConfig) -> DiTConfig:
    """Calibration captures and trains with the text conditioning, plus the image latent and mask channels
    appended to the latent (1.0 I2V, 1.5: calib.pipeline.Conditioning.concat) and 1.5's byT5 / image tokens
    (Conditioning.tokens). Not the distilled 1.5 models' second timestep (meanflow) nor the other variants."""
    if config.variant not in (T2V, I2V, V15) or config.meanflow:
        what = f"{config.variant} (meanflow-distilled)" if config.meanflow else config.variant
        raise ValueError(f"this is {what}; QuantSparse calibrates HunyuanVideo 1.0 (T2V, I2V) and 1.5 transformers "
                         "only so far: load a HunyuanVideo 1.0 checkpoint (e.g. hunyuan_video_t2v_720p_bf16.safetensors) "
                         "or a 1.5 one, or compress this one round-to-nearest")
    return config


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
        byt5_in_dim=shape("byt5_in.fc1.weight")[1] if "byt5_in.fc1.weight" in sd else None,
        byt5_hidden=shape("byt5_in.fc1.weight")[0] if "byt5_in.fc1.weight" in sd else 2048,
        vision_in_dim=shape("vision_in.proj.0.weight")[0] if "vision_in.proj.0.weight" in sd else None,
        cond_type_embedding="cond_type_embedding.weight" in sd,
        meanflow=any(k.startswith("time_r_in.") for k in keys),
    )

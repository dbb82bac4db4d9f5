"""Wan 2.1 / 2.2 DiT with ComfyUI's state-dict key names and math (comfy/ldm/wan/model.py, WanModel).

One checkpoint loads both here and in ComfyUI's stock loader. Unlike HunyuanVideo, self-attention
covers the video tokens only and text (plus CLIP image tokens on I2V) enters through a separate
cross-attention. Every self-attention goes through `self.attention_fn` with an AttentionCall whose
txt_len is 0 (see attention.py), so a sparse or quantized attention replaces it without touching the
model; cross-attention stays dense (`cross_attention`).

Covers the Wan 2.1 T2V/I2V/FLF2V and Wan 2.2 A14B (same shapes as 2.1 14B) and TI2V-5B transformers;
ComfyUI's other Wan-based models (VACE, camera, S2V, HuMo, Animate, ...) are refused when read.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionCall, AttentionFn, RoutedAttention, StepInfo, dense_attention
from .layers import apply_rope

HEAD_DIM = 128    # ComfyUI derives num_heads = dim / 128 for Wan
CLIP_DIM = 1280   # CLIP ViT-H penultimate width: ComfyUI fixes img_emb's input to it
# ComfyUI names Wan's blocks "double" in transformer_options; our calls use the same name so that the
# node-side and core-side attention hooks (and SSAR's per-block state) key Wan blocks identically.
BLOCK_TYPE = "double"

# The Wan transformers QuantSparse runs, by what ComfyUI builds from their files (WanModel, plain):
WAN_T2V = "Wan 2.1/2.2 T2V"            # 2.1 T2V 1.3B and 14B, the two 2.2 A14B T2V experts
WAN21_I2V = "Wan 2.1 I2V"              # CLIP image tokens in cross-attention (also FLF2V)
WAN22_I2V = "Wan 2.2 I2V"              # the 2.2 A14B I2V experts: image latent concatenated, no CLIP tokens
WAN22_TI2V = "Wan 2.2 TI2V 5B"         # 48-channel latent of its own VAE
WAN_VARIANTS = (WAN_T2V, WAN21_I2V, WAN22_I2V, WAN22_TI2V)


def wan_variant(model_type: str, in_dim: int, out_dim: int, patch_size, head_dim: int) -> str:
    """The variant name of a Wan architecture (one of WAN_VARIANTS), or a description of one QuantSparse
    does not run. Shared by WanConfig and the nodes' reading of ComfyUI's WanModel."""
    if tuple(patch_size) == (1, 2, 2) and head_dim == HEAD_DIM:
        if model_type == "i2v" and in_dim == 36 and out_dim == 16:
            return WAN21_I2V
        if model_type == "t2v" and out_dim == 16:
            return {16: WAN_T2V, 36: WAN22_I2V}.get(in_dim, f"a Wan model with {in_dim} input channels "
                                                            "(Fun control or inpaint)")
        if model_type == "t2v" and in_dim == out_dim == 48:
            return WAN22_TI2V
    return (f"an unknown Wan configuration ({model_type}, in {in_dim} / out {out_dim} channels, patch "
            f"{list(patch_size)}, head width {head_dim})")


# Keys of ComfyUI's Wan-based models that are not plain T2V/I2V/TI2V transformers (model_detection.py).
FOREIGN_KEYS = {
    "vace_patch_embedding.weight": "Wan VACE", "control_adapter.conv.weight": "Wan camera control",
    "casual_audio_encoder.encoder.final_linear.weight": "Wan 2.2 S2V",
    "audio_proj.audio_proj_glob_1.layer.bias": "HuMo", "face_adapter.fuser_blocks.0.k_norm.weight": "Wan 2.2 Animate",
    "patch_embedding_mask.weight": "SCAIL", "patch_embedding_pose.weight": "SCAIL",
    "patch_embedding_global.weight": "WanDancer", "ref_conv.weight": "Wan Fun (reference image)",
}


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan transformer; field names are ComfyUI's WanModel arguments."""
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple = (1, 2, 2)
    model_type: str = "t2v"                       # "i2v": CLIP image tokens through img_emb and k_img/v_img
    flf_pos_embed_token_number: int | None = None  # FLF2V: learned positions of the image tokens
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.model_type not in ("t2v", "i2v"):
            raise ValueError(f"model_type {self.model_type!r} unsupported; use 't2v' or 'i2v'")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} must split into {self.num_heads} heads of even width")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size {self.patch_size} must be three positive sizes (frames, rows, cols)")
        if self.flf_pos_embed_token_number is not None and self.model_type != "i2v":
            raise ValueError("flf_pos_embed_token_number needs model_type 'i2v' (image tokens)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_axes(self) -> tuple:
        """RoPE channels per (frame, row, col) axis: ComfyUI's split d - 4*(d//6), 2*(d//6), 2*(d//6)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @property
    def comfy_model(self) -> str | None:
        """The class in comfy/supported_models.py that ComfyUI's detection picks for this architecture,
        or None where its detection (patch (1, 2, 2), heads = dim / 128) would misread it."""
        if tuple(self.patch_size) != (1, 2, 2) or self.head_dim != HEAD_DIM:
            return None
        if self.model_type == "t2v":
            return "WAN22_T2V" if self.out_dim == 48 else "WAN21_T2V"
        return {36: "WAN21_I2V", 48: "WAN21_FunControl2V"}.get(self.in_dim)

    @property
    def variant(self) -> str:
        """Which Wan model this architecture is (WAN_VARIANTS), by the rules ComfyUI's loader applies."""
        return wan_variant(self.model_type, self.in_dim, self.out_dim, self.patch_size, self.head_dim)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WanConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown Wan config fields {sorted(unknown)}; written by a newer or different tool")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN_PRESETS: dict[str, WanConfig] = {
    "wan2.1-1.3b": WanConfig(),                                          # Wan2.1 T2V 1.3B
    "wan2.1-14b": WanConfig(**_14B),                                     # Wan2.1 T2V 14B; Wan2.2 A14B T2V experts
    "wan2.1-i2v-14b": WanConfig(**_14B, in_dim=36, model_type="i2v"),  # 16 latent + 16 image + 4 mask, CLIP tokens
    "wan2.2-i2v-a14b": WanConfig(**_14B, in_dim=36),                     # Wan2.2 I2V experts: no CLIP tokens
    # Wan2.2 TI2V-5B: 48-channel latent of its own VAE; image conditioning by per-frame timesteps.
    "wan2.2-5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    # Small random-weight shapes for tests; head dim 128 and text width 4096 so ComfyUI's loader reads them.
    "wan-test": WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2),
    "wan-test-i2v": WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, model_type="i2v"),
    # The embedded tiny Wan (models/tiny: trained on the tiny HunyuanVideo's procedural videos); text width 4096
    # as ComfyUI's WanModel assumes, the tiny prompt encoder's 64-wide tokens zero-padded into it.
    "tiny-wan": WanConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=4),
}


def get_wan_preset(name: str) -> WanConfig:
    try:
        return WAN_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {sorted(WAN_PRESETS)}") from None


# -- math --------------------------------------------------------------------------------------------

def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and narrower models (ComfyUI's choice for embeddings and RoPE), fp64 for fp64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def sinusoid(t: torch.Tensor, dim: int, dtype=torch.float32) -> torch.Tensor:
    """[cos | sin] embedding of positions t [N] with frequencies 10000^(-i/half)."""
    half = dim // 2
    pos = t.to(dtype)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=dtype, device=t.device) / half)
    args = torch.outer(pos, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def wan_rope(grid, axes, theta: float, device, dtype=torch.float32) -> torch.Tensor:
    """Rotation table [1, 1, T*H*W, head_dim/2, 2, 2] for the video token grid, in apply_rope's layout.

    Angles are computed per axis in float64 (at most a few hundred positions) and expanded to the grid
    afterwards, so the table is exact to `dtype` on any device and cheap to build."""
    t, h, w = grid
    parts = []
    for a, (n, dim) in enumerate(zip(grid, axes)):
        omega = 1.0 / theta ** torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * omega
        cos, sin = torch.cos(ang), torch.sin(ang)
        mats = torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).to(device=device, dtype=dtype)
        shape = [1, 1, 1, dim // 2, 2, 2]
        shape[a] = n
        parts.append(mats.view(shape).expand(t, h, w, -1, -1, -1))
    return torch.cat(parts, dim=-3).reshape(1, 1, t * h * w, -1, 2, 2)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def cross_attention(q, k, v, heads: int) -> torch.Tensor:
    """Dense unmasked attention of [B, L, H*D] inputs -> [B, L, H*D] (Wan's text and image tokens)."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return out.transpose(1, 2).flatten(2)


def per_frame(x: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, L, C] -> [B, rows, L/rows, C], so a [B, rows, 1, C] modulation broadcasts over each row's tokens
    (Wan 2.2's per-frame timesteps); rows == 1 is the usual one-timestep case."""
    return x.unflatten(1, (rows, -1))


# -- modules -----------------------------------------------------------------------------------------

def _linear(i, o, kw):
    return nn.Linear(i, o, **kw)


class WanSelfAttention(nn.Module):
    """q/k/v/o projections with RMSNorm over the full width of q and k (Wan's qk_norm)."""

    def __init__(self, dim, heads, eps, kw):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (_linear(dim, dim, kw) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=eps, **kw)
        self.norm_k = nn.RMSNorm(dim, eps=eps, **kw)

    def forward(self, x, rope, attention_fn: AttentionFn, call: AttentionCall):
        q = apply_rope(split_heads(self.norm_q(self.q(x)), self.heads), rope)
        k = apply_rope(split_heads(self.norm_k(self.k(x)), self.heads), rope)
        v = split_heads(self.v(x), self.heads)
        return self.o(attention_fn(q, k, v, None, call))


class WanCrossAttention(WanSelfAttention):
    """Queries from video tokens, keys/values from text; I2V adds a second attention over the CLIP image
    tokens (k_img / v_img) whose output is summed with the text attention's before `o`."""

    def __init__(self, dim, heads, eps, kw, image: bool):
        super().__init__(dim, heads, eps, kw)
        if image:
            self.k_img, self.v_img = _linear(dim, dim, kw), _linear(dim, dim, kw)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps, **kw)

    def forward(self, x, text, image=None):
        q = self.norm_q(self.q(x))
        out = cross_attention(q, self.norm_k(self.k(text)), self.v(text), self.heads)
        if image is not None:
            out = out + cross_attention(q, self.norm_k_img(self.k_img(image)), self.v_img(image), self.heads)
        return self.o(out)


class WanBlock(nn.Module):
    """Self-attention, cross-attention, FFN. Modulation = learned table [1, 6, dim] + the shared time
    projection: (shift, scale, gate) for self-attention, then for the FFN; cross-attention is unmodulated."""

    def __init__(self, c: WanConfig, kw):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=False, **kw)
        self.self_attn = WanSelfAttention(c.dim, c.num_heads, c.eps, kw)
        self.norm3 = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=True, **kw)
        self.cross_attn = WanCrossAttention(c.dim, c.num_heads, c.eps, kw, image=c.model_type == "i2v")
        self.norm2 = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=False, **kw)
        self.ffn = nn.Sequential(_linear(c.dim, c.ffn_dim, kw), nn.GELU(approximate="tanh"),
                                 _linear(c.ffn_dim, c.dim, kw))
        self.modulation = nn.Parameter(torch.randn(1, 6, c.dim, **kw) / c.dim ** 0.5)  # Wan's own init

    def forward(self, x, e, rope, text, image, attention_fn: AttentionFn, call: AttentionCall):
        """x [B, L, C]; e: time projection [B, R, 6, C] with R = 1 or one row per latent frame."""
        rows = e.shape[1]
        mods = (self.modulation.to(x.dtype).unsqueeze(0) + e).unsqueeze(3).unbind(2)  # six [B, R, 1, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods

        def modulated(norm, shift, scale):
            return torch.addcmul(shift, per_frame(norm(x), rows), 1 + scale).flatten(1, 2)

        y = self.self_attn(modulated(self.norm1, shift1, scale1), rope, attention_fn, call)
        x = torch.addcmul(per_frame(x, rows), per_frame(y, rows), gate1).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x), text, image)
        y = self.ffn(modulated(self.norm2, shift2, scale2))
        return torch.addcmul(per_frame(x, rows), per_frame(y, rows), gate2).flatten(1, 2)


class WanHead(nn.Module):
    def __init__(self, c: WanConfig, kw):
        super().__init__()
        self.norm = nn.LayerNorm(c.dim, eps=c.eps, elementwise_affine=False, **kw)
        self.head = _linear(c.dim, math.prod(c.patch_size) * c.out_dim, kw)
        self.modulation = nn.Parameter(torch.randn(1, 2, c.dim, **kw) / c.dim ** 0.5)

    def forward(self, x, e):
        """e: time embedding (not its projection) [B, R, C]."""
        shift, scale = (self.modulation.to(x.dtype).unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3).unbind(2)
        return self.head(torch.addcmul(shift, per_frame(self.norm(x), e.shape[1]), 1 + scale).flatten(1, 2))


class ImageEmbedding(nn.Module):
    """CLIP image tokens [B, N, 1280] -> [B, N, dim] (ComfyUI's MLPProj, keys img_emb.proj.{0,1,3,4})."""

    def __init__(self, c: WanConfig, kw):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(CLIP_DIM, **kw), _linear(CLIP_DIM, CLIP_DIM, kw), nn.GELU(),
                                  _linear(CLIP_DIM, c.dim, kw), nn.LayerNorm(c.dim, **kw))
        n = c.flf_pos_embed_token_number
        self.emb_pos = nn.Parameter(torch.zeros(1, n, CLIP_DIM, **kw)) if n else None

    def forward(self, tokens):
        if self.emb_pos is not None:
            n = min(tokens.shape[1], self.emb_pos.shape[1])
            tokens = tokens[:, :n] + self.emb_pos[:, :n].to(tokens.dtype)
        return self.proj(tokens)


class WanDiT(RoutedAttention, nn.Module):
    def __init__(self, config: WanConfig, device=None, dtype=None):
        super().__init__()
        self.config = c = config
        kw = dict(device=device, dtype=dtype)
        # ComfyUI keeps the patch embedding in float32 whatever the model dtype (few input channels).
        conv_dtype = _work_dtype(dtype or torch.get_default_dtype())
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, c.patch_size, stride=c.patch_size, device=device,
                                         dtype=conv_dtype)
        self.text_embedding = nn.Sequential(_linear(c.text_dim, c.dim, kw), nn.GELU(approximate="tanh"),
                                            _linear(c.dim, c.dim, kw))
        self.time_embedding = nn.Sequential(_linear(c.freq_dim, c.dim, kw), nn.SiLU(), _linear(c.dim, c.dim, kw))
        self.time_projection = nn.Sequential(nn.SiLU(), _linear(c.dim, 6 * c.dim, kw))
        self.blocks = nn.ModuleList(WanBlock(c, kw) for _ in range(c.num_layers))
        self.head = WanHead(c, kw)
        self.img_emb = ImageEmbedding(c, kw) if c.model_type == "i2v" else None
        self.attention_fn: AttentionFn = dense_attention

    def token_grid(self, x: torch.Tensor) -> tuple:
        """Token grid (frames, rows, cols) of a latent [B, C, T, H, W] after padding to the patch size."""
        if x.ndim != 5:
            raise ValueError(f"latent must be [batch, channels, frames, height, width], got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_dim:
            hint = ""
            if x.shape[1] < self.config.in_dim:
                hint = (" (an image-to-video model: concatenate the mask and image-latent channels to the noisy "
                        "latent first, as ComfyUI's concat_cond does)")
            raise ValueError(f"latent has {x.shape[1]} channels; this model takes {self.config.in_dim}{hint}")
        return tuple(-(-n // p) for n, p in zip(x.shape[2:], self.config.patch_size))

    def _check_inputs(self, x, timestep, context, clip_fea, grid):
        c, b = self.config, x.shape[0]
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != c.text_dim:
            raise ValueError(f"context must be [batch={b}, tokens, {c.text_dim}], got {tuple(context.shape)}")
        if timestep.ndim not in (1, 2) or timestep.shape[0] != b or (timestep.ndim == 2 and
                                                                     timestep.shape[1] not in (1, grid[0])):
            raise ValueError(f"timestep must be [batch={b}] or, per latent frame, [batch, {grid[0]}]; got "
                             f"{tuple(timestep.shape)}")
        if self.img_emb is not None:
            if clip_fea is None:
                raise ValueError("this image-to-video model needs clip_fea, the CLIP vision penultimate tokens "
                                 f"[batch, 257, {CLIP_DIM}] (ComfyUI: CLIPVisionEncode into WanImageToVideo)")
            if clip_fea.ndim != 3 or clip_fea.shape[0] != b or clip_fea.shape[-1] != CLIP_DIM:
                raise ValueError(f"clip_fea must be [batch={b}, tokens, {CLIP_DIM}], got {tuple(clip_fea.shape)}")

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                clip_fea: Optional[torch.Tensor] = None, step: Optional[StepInfo] = None) -> torch.Tensor:
        """Velocity prediction [B, out_dim, T, H, W].

        x: latent [B, in_dim, T, H, W] (I2V: mask and image latent already concatenated); sizes that are not
        multiples of the patch are padded circularly and cropped back, as ComfyUI does. timestep: sigma * 1000,
        [B], or [B, T'] with one value per latent frame (Wan 2.2 TI2V). context: text tokens [B, Lt, text_dim].
        clip_fea: CLIP image tokens [B, N, 1280], required by I2V models; a T2V model ignores it (as ComfyUI).
        """
        c = self.config
        grid = self.token_grid(x)
        self._check_inputs(x, timestep, context, clip_fea, grid)
        t, h, w = x.shape[2:]
        tokens = self.patchify(x)
        work = _work_dtype(x.dtype)
        e = self.time_embedding(sinusoid(timestep.flatten(), c.freq_dim, work).to(x.dtype))
        e = e.reshape(x.shape[0], -1, c.dim)                                # [B, R, C]
        e0 = self.time_projection(e).unflatten(2, (6, c.dim))               # [B, R, 6, C]

        text = self.text_embedding(context)
        image = self.img_emb(clip_fea) if self.img_emb is not None else None
        rope = wan_rope(grid, c.rope_axes, c.rope_theta, x.device, work)
        for i, block in enumerate(self.blocks):
            call = AttentionCall(BLOCK_TYPE, i, len(self.blocks), 0, grid, step)
            tokens = block(tokens, e0, rope, text, image, self.attention_fn, call)
        out = self.unpatchify(self.head(tokens, e), grid)
        return out[:, :, :t, :h, :w]

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latent -> tokens [B, T*H*W, dim]: pad circularly to the patch size (ComfyUI's pad_to_patch_size),
        then the fp32 patch embedding. Contiguous: block 0 then computes on the same memory layout as every later
        block and as its captured inputs (calibration replays them), so float32 GEMMs round identically."""
        pad = []
        for n, p in zip(reversed(x.shape[2:]), reversed(self.config.patch_size)):
            pad += [0, (-n) % p]
        if any(pad):
            x = F.pad(x, pad, mode="circular")
        weight_dtype = self.patch_embedding.weight.dtype
        return self.patch_embedding(x.to(weight_dtype)).to(x.dtype).flatten(2).transpose(1, 2).contiguous()

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """[B, T*H*W, pt*ph*pw*C] -> [B, C, T*pt, H*ph, W*pw] (channel-last inside a patch, as Wan)."""
        t, h, w = grid
        pt, ph, pw = self.config.patch_size
        b = tokens.shape[0]
        x = tokens.reshape(b, t, h, w, pt, ph, pw, self.config.out_dim)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, t * pt, h * ph, w * pw)


# -- reading a checkpoint ----------------------------------------------------------------------------

def _count_blocks(keys, prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    if idx != set(range(len(idx))):
        raise ValueError(f"blocks under {prefix!r} are not numbered 0..n-1: {sorted(idx)[:8]}")
    return len(idx)


def wan_config_from_state_dict(sd) -> WanConfig:
    """Read the architecture from a ComfyUI-format Wan state dict (or a dict of anything with .shape),
    with ComfyUI's rules (heads = dim / 128), then check every key and shape against the model it names.
    Raises a ValueError naming the problem otherwise."""
    keys = list(sd.keys())
    if "head.modulation" not in sd:
        prefixed = [k for k in keys if k.endswith("head.modulation")]
        if prefixed:
            raise ValueError(f"the keys carry a prefix ({prefixed[0][:-len('head.modulation')]!r}); strip it first "
                             "(ComfyUI's diffusion-model file format has none)")
        raise ValueError("this is not a Wan transformer state dict (no 'head.modulation'); QuantSparse needs Wan "
                         "weights in ComfyUI's key format (e.g. wan2.1_t2v_14B_bf16.safetensors)")
    for key, name in FOREIGN_KEYS.items():
        if key in sd:
            raise ValueError(f"this is a {name} model; QuantSparse supports the Wan 2.1 / 2.2 T2V, I2V and TI2V "
                             "transformers only")
    shape = lambda k: tuple(sd[k].shape)  # noqa: E731
    missing = [k for k in ("patch_embedding.weight", "head.head.weight", "blocks.0.ffn.0.weight",
                           "text_embedding.0.weight", "time_embedding.0.weight") if k not in sd]
    if missing:
        raise ValueError(f"Wan state dict is missing {missing}; the file is truncated or not a Wan transformer")
    dim = shape("head.modulation")[-1]
    if dim % HEAD_DIM:
        raise ValueError(f"Wan width {dim} is not a multiple of {HEAD_DIM}; ComfyUI cannot read this model either")
    patch = shape("patch_embedding.weight")[2:]
    if len(patch) != 3:
        raise ValueError(f"patch_embedding.weight has shape {shape('patch_embedding.weight')}; expected a 3-D patch")
    config = WanConfig(
        dim=dim, ffn_dim=shape("blocks.0.ffn.0.weight")[0], num_heads=dim // HEAD_DIM,
        num_layers=_count_blocks(keys, "blocks."), in_dim=shape("patch_embedding.weight")[1],
        out_dim=shape("head.head.weight")[0] // math.prod(patch), text_dim=shape("text_embedding.0.weight")[1],
        freq_dim=shape("time_embedding.0.weight")[1], patch_size=patch,
        model_type="i2v" if "img_emb.proj.0.bias" in sd else "t2v",
        flf_pos_embed_token_number=shape("img_emb.emb_pos")[1] if "img_emb.emb_pos" in sd else None)
    check_state_dict(config, sd)
    return config


def check_state_dict(config: WanConfig, sd) -> None:
    """Raise a ValueError unless `sd` has exactly the keys and shapes of WanDiT(config)."""
    want = {k: tuple(v.shape) for k, v in WanDiT(config, device="meta").state_dict().items()}
    unexpected = sorted(set(sd) - set(want))
    missing = sorted(set(want) - set(sd))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if unexpected or missing or wrong:
        raise ValueError(f"Wan state dict does not match the architecture its keys describe: unexpected "
                         f"{unexpected[:3]}, missing {missing[:3]}, wrong shape {wrong[:3]}")

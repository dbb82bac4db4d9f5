"""HunyuanVideo DiT with ComfyUI's state-dict key names and math.

One checkpoint loads both here and in ComfyUI's stock loader. Every attention goes through
`self.attention_fn`, which is told the block and sampling step it serves (see attention.py).
Covers HunyuanVideo 1.0 T2V and I2V (concatenated image channels, reference-latent tokens) and
HunyuanVideo 1.5 (byT5 and image tokens, see conditioning.py); the config says which parts exist.

Joint sequence: [text part, reference tokens, video tokens], where the text part is
[image tokens, byT5 tokens, text tokens] on 1.5 and just the text tokens on 1.0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import AttentionCall, AttentionFn, RoutedAttention, StepInfo, dense_attention
from .config import DiTConfig
from .blocks import DoubleStreamBlock, FinalLayer, SingleStreamBlock, TokenRefiner
from .conditioning import ByT5Mapper, VisionIn, text_part
from .fusion import small_ops
from .layers import MLPEmbedder, rope_table, timestep_embedding


# Additive value of a padded text token. -finfo.max (ComfyUI's choice) doubles to -inf in the token
# refiner (mask + its transpose), so a prompt with no real token (the empty prompt, the documented
# unconditional input) gives a softmax over all -inf keys = NaN. -1e4 stays finite in fp16 even doubled,
# and exp(-1e4 + score) is exactly 0 in fp32 for any attention score, so real prompts are unchanged.
TEXT_MASK_FLOOR = -1.0e4


def additive_text_mask(mask: torch.Tensor, dtype) -> torch.Tensor:
    """[B, L] text mask (1/True = token, 0 = padding; or additive float) -> finite additive mask in `dtype`."""
    if not dtype.is_floating_point:
        dtype = torch.float32
    if torch.is_floating_point(mask):
        return mask.to(dtype).clamp(min=TEXT_MASK_FLOOR)
    return torch.where(mask.bool(), 0.0, TEXT_MASK_FLOOR).to(dtype)


@dataclass(frozen=True)
class RefAttentionCall(AttentionCall):
    """An AttentionCall of a sequence with `ref_len` reference-latent tokens between the text part
    (`txt_len`) and the video grid. Reference tokens are image tokens, not text, for any sparsity mask."""
    ref_len: int = 0


class HunyuanVideoDiT(RoutedAttention, nn.Module):
    def __init__(self, config: DiTConfig, device=None, dtype=None):
        super().__init__()
        if config.patch_size[0] != 1 or config.patch_size[1] != config.patch_size[2]:
            raise ValueError(f"patch_size {config.patch_size} unsupported; HunyuanVideo uses (1, p, p)")
        self.config = c = config
        kw = dict(device=device, dtype=dtype)
        self.img_in = nn.Module()
        self.img_in.proj = nn.Conv3d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size, **kw)
        self.time_in = MLPEmbedder(256, c.hidden_size, **kw)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size, **kw) if c.vec_in_dim else None
        self.guidance_in = MLPEmbedder(256, c.hidden_size, **kw) if c.guidance_embed else None
        self.txt_in = TokenRefiner(c.context_in_dim, c.hidden_size, c.num_heads, c.refiner_blocks, **kw)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden, **kw) for _ in range(c.depth_double))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden, **kw) for _ in range(c.depth_single))
        patch_numel = c.patch_size[1] * c.patch_size[2]
        self.final_layer = FinalLayer(c.hidden_size, patch_numel, c.out_channels, **kw)
        # HunyuanVideo 1.5 only (registered after the 1.0 modules: 1.0 state dicts keep their order).
        self.byt5_in = ByT5Mapper(c.byt5_in_dim, c.byt5_hidden, c.hidden_size, **kw) if c.byt5_in_dim else None
        self.time_r_in = MLPEmbedder(256, c.hidden_size, **kw) if c.meanflow else None
        self.vision_in = VisionIn(c.vision_in_dim, c.hidden_size, **kw) if c.vision_in_dim else None
        self.cond_type_embedding = nn.Embedding(3, c.hidden_size, **kw) if c.cond_type_embedding else None
        self.attention_fn: AttentionFn = dense_attention

    def fuse_small_ops(self, enable: bool = True, compile: bool = True,
                       quantize_inputs: bool = True) -> "HunyuanVideoDiT":
        """Opt in to grouped small ops in the double and single blocks (fusion.SmallOps): norm +
        modulation, q/k norm + RoPE, gated residuals, GELU + concat, each group torch.compile'd into
        few kernels (compile=False runs the same grouping eagerly). Attention and linears stay
        outside the compiled regions, so attention hooks and QuantLinear work unchanged.
        quantize_inputs: where the next linear is a QuantLinear on the kernel path (no rotation), the
        group also quantizes its output for it (qkv, MLP fc1/fc2, single linear1/linear2 inputs), so
        no separate activation-quantization pass runs; the attention output projection keeps it.
        Off by default: the eager path is the one proven equal to ComfyUI."""
        ops = small_ops(compile) if enable else None
        for block in (*self.double_blocks, *self.single_blocks):
            block.ops, block.quantize_inputs = ops, bool(enable and quantize_inputs)
        return self

    def token_grid(self, x: torch.Tensor, name: str = "latent") -> tuple:
        """Video token grid (frames, rows, cols) for a latent [B, C, T, H, W]; errors if it does not fit."""
        if x.ndim != 5:
            raise ValueError(f"{name} must be [batch, channels, frames, height, width], got shape {tuple(x.shape)}")
        if x.shape[1] != self.config.in_channels:
            hint = ""
            if self.config.in_channels > 16 and x.shape[1] < self.config.in_channels:
                hint = (" (an image-to-video model: concatenate the image latent and mask channels to the noisy "
                        "latent first)")
            raise ValueError(f"{name} has {x.shape[1]} channels; this model takes {self.config.in_channels}{hint}")
        _, p, q = self.config.patch_size
        t, h, w = x.shape[2:]
        if h % p or w % q:
            raise ValueError(f"{name} height/width {h}x{w} is not divisible by the patch size {p}x{q}; "
                             f"use a resolution whose latent is a multiple of {p}")
        return t, h // p, w // q

    def positions(self, grid, batch: int, txt_len: int, device, ref_grid=None) -> torch.Tensor:
        """3-D positions [B, txt_len + R + T*H*W, 3]: text at 0, reference tokens (R of them, grid
        `ref_grid`) at (-1, row, col + W), video at (frame, row, col)."""
        def lattice(g):
            axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32, device=device) for n in g), indexing="ij")
            return torch.stack(axes, dim=-1).reshape(-1, 3)

        parts = [torch.zeros(txt_len, 3, device=device)]
        if ref_grid is not None:
            ref = lattice(ref_grid)
            ref[:, 0] = -1.0
            ref[:, 2] += grid[2]
            parts.append(ref)
        parts.append(lattice(grid))
        return torch.cat(parts).unsqueeze(0).expand(batch, -1, -1)

    def _vector(self, timestep, y, guidance, timestep_r, dtype):
        """The modulation vector: timestep (+ next-sigma embedding) + pooled text + embedded guidance."""
        c = self.config
        vec = self.time_in(timestep_embedding(timestep).to(dtype))
        if self.time_r_in is not None and timestep_r is not None:
            vec_r = self.time_r_in(timestep_embedding(timestep_r, time_factor=1000.0).to(dtype))
            # ComfyUI sums the two on 1.5 (models with image tokens) and averages them otherwise.
            vec = vec + vec_r if self.vision_in is not None else (vec + vec_r) / 2
        if self.vector_in is not None:
            if y is None:
                raise ValueError("this model needs the pooled text embedding y")
            vec = vec + self.vector_in(y[:, :c.vec_in_dim])
        if self.guidance_in is not None and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, time_factor=1000.0).to(dtype))
        return vec

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                y: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, step: Optional[StepInfo] = None, *,
                ref_latent: Optional[torch.Tensor] = None, txt_byt5: Optional[torch.Tensor] = None,
                clip_fea: Optional[torch.Tensor] = None, timestep_r: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity prediction.

        x: latent [B, C, T, H, W] with the model's in_channels (I2V: image latent and mask already
        concatenated, as ComfyUI's concat_cond does); timestep: sigma * 1000, [B]; context: text tokens
        [B, Lt, D]; y: pooled text [B, 768] (1.0 only); guidance: embedded guidance scale [B];
        attention_mask: [B, Lt] over `context` with 1 for real tokens and 0 for padding (or an additive
        float mask); byT5 and image tokens are never masked.
        ref_latent: reference latent [B, C, T', H', W'] whose tokens join the video stream (1.0 I2V "custom");
        txt_byt5: ByT5 glyph tokens [B, Lb, byt5_in_dim] (1.5); clip_fea: image-encoder tokens
        [B, Lv, vision_in_dim] (1.5 I2V); timestep_r: the next sigma (0..1), [B] or [1] (meanflow models).
        """
        c = self.config
        grid = self.token_grid(x)
        if context.ndim != 3 or context.shape[-1] != c.context_in_dim:
            raise ValueError(f"context must be [batch, tokens, {c.context_in_dim}], got {tuple(context.shape)}")
        b, ctx_len = x.shape[0], context.shape[1]

        def refiner_call(kind, index, count):
            return AttentionCall(kind, index, count, ctx_len, grid, step)

        img = self.img_in.proj(x).flatten(2).transpose(1, 2)
        vec = self._vector(timestep, y, guidance, timestep_r, img.dtype)
        ref_grid, ref_len = None, 0
        if ref_latent is not None:
            ref_grid = self.token_grid(ref_latent, "ref_latent")
            if ref_latent.shape[0] != b:
                raise ValueError(f"ref_latent has batch {ref_latent.shape[0]}; the latent has batch {b}")
            ref = self.img_in.proj(ref_latent).flatten(2).transpose(1, 2)
            ref_len = ref.shape[1]
            img = torch.cat((ref, img), dim=1)

        txt_mask = None if attention_mask is None else additive_text_mask(attention_mask, img.dtype)
        txt = self.txt_in(context, timestep, txt_mask, self.attention_fn, refiner_call)
        extra = 0
        if self.cond_type_embedding is not None:
            txt, extra = text_part(txt, self.cond_type_embedding, self.byt5_in, txt_byt5, self.vision_in, clip_fea)
        elif txt_byt5 is not None or clip_fea is not None:
            raise ValueError("txt_byt5 / clip_fea are HunyuanVideo 1.5 inputs; this model has no byT5 or image-token "
                             "input")
        txt_len = txt.shape[1]

        def call_for(kind, index, count):
            if ref_len:
                return RefAttentionCall(kind, index, count, txt_len, grid, step, ref_len)
            return AttentionCall(kind, index, count, txt_len, grid, step)

        rope = rope_table(self.positions(grid, b, txt_len, x.device, ref_grid), c.rope_axes, c.rope_theta)
        mask = None
        if txt_mask is not None:
            # [B, 1, L] additive mask over keys (ComfyUI builds [1, 1, L], i.e. batch 1 only).
            mask = torch.zeros(txt_mask.shape[0], 1, txt_len + img.shape[1], dtype=img.dtype, device=img.device)
            mask[:, 0, extra:txt_len] = txt_mask
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img, txt, vec, rope, mask, self.attention_fn, call_for("double", i, len(self.double_blocks)))
        joint = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            joint = block(joint, vec, rope, mask, self.attention_fn, call_for("single", i, len(self.single_blocks)))
        out = self.final_layer(joint[:, txt_len + ref_len:], vec)
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        """[B, T*H*W, C*pt*ph*pw] -> [B, C, T*pt, H*ph, W*pw] (channel-major inside a patch)."""
        t, h, w = grid
        pt, ph, pw = self.config.patch_size
        cout = self.config.out_channels
        x = tokens.reshape(tokens.shape[0], t, h, w, cout, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(tokens.shape[0], cout, t * pt, h * ph, w * pw)

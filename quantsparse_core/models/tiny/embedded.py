"""The embedded tiny model: where its weights live and how to generate videos with it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec import LatentCodec
from .prompts import PromptEncoder
from ..sampler import HUNYUAN_SHIFT, WAN_SHIFT, flow_sigmas, initial_noise, sample_euler, sample_wan
from ..weights import load_dit

WEIGHTS = Path(__file__).with_name("tiny_dit.safetensors")
WAN_WEIGHTS = Path(__file__).with_name("tiny_wan.safetensors")  # the tiny Wan (train.py --family wan)
FRAMES, SIZE = 8, 128                                # pixels: 8 frames of 128 x 128
LATENT_SHAPE = (16, FRAMES, SIZE // 4, SIZE // 4)    # -> 8 x 16 x 16 = 2048 video tokens
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 6.0


def load_embedded(device="cpu", dtype=torch.float32):
    """The trained tiny DiT and its header (config, training command, final loss)."""
    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"embedded weights missing at {WEIGHTS}; reinstall QuantSparse or re-create them "
                                "with `python -m quantsparse_core.models.tiny.train` (README)")
    model, meta = load_dit(WEIGHTS, device=device, dtype=dtype)
    return model, {k: (json.loads(v) if v[:1] in "{[" else v) for k, v in meta.items()}


@dataclass
class Generation:
    latents: torch.Tensor   # [B, 16, F, h, w]
    videos: torch.Tensor    # [B, 3, F, H, W] in [0, 1]


def trained_for_cfg(meta: dict) -> bool:
    """Whether weights (their header) saw the empty prompt in training (--cond-dropout > 0): only such weights
    take cfg > 1."""
    return float(meta.get("cond_dropout", 0) or 0) > 0


class ClassifierFreeGuidance:
    """A model's velocity under classifier-free guidance, as ComfyUI's cfg applies it: v(empty prompt) +
    cfg * (v(prompt) - v(empty prompt)). Two calls per step (prompt, then the unconditional input), so the
    padded text masks of the two never meet in one batch."""

    def __init__(self, model, cfg: float, batch: int, like: torch.Tensor):
        self.model, self.cfg = model, float(cfg)
        ctx, mask, pooled = PromptEncoder().encode([""] * batch)
        self.uncond = ctx.to(like), mask.to(like.device), pooled.to(like)

    def __call__(self, x, t, context, pooled, attention_mask=None, **kw):
        cond = self.model(x, t, context, pooled, attention_mask=attention_mask, **kw).float()
        ctx_u, mask_u, pooled_u = self.uncond
        uncond = self.model(x, t, ctx_u, pooled_u, attention_mask=mask_u, **kw).float()
        return (uncond + self.cfg * (cond - uncond)).to(x.dtype)


def generate(model, prompts, seeds, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
             shift: float = HUNYUAN_SHIFT, latent_shape=LATENT_SHAPE, on_step=None, cfg: float = 1.0) -> Generation:
    """Text-to-video with the flow-matching Euler sampler; one seed per prompt. cfg > 1: classifier-free
    guidance against the empty prompt (weights trained with --cond-dropout > 0 only)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not cfg >= 1.0:
        raise ValueError(f"cfg must be >= 1 (1 = no guidance), got {cfg}")
    param = next(model.parameters())
    ctx, mask, pooled = PromptEncoder().encode(list(prompts))
    ctx, pooled = ctx.to(param), pooled.to(param)
    mask = mask.to(param.device)
    noise = torch.cat([initial_noise((1, *latent_shape), s, param.device, param.dtype) for s in seeds])
    velocity = model if cfg == 1.0 else ClassifierFreeGuidance(model, cfg, len(prompts), param)
    lat = sample_euler(velocity, noise, ctx, pooled, flow_sigmas(steps, shift), attention_mask=mask,
                       guidance=guidance, on_step=on_step)
    return Generation(lat, LatentCodec().decode(lat.float()))


def load_wan(path=WAN_WEIGHTS, device="cpu", dtype=torch.float32):
    """The trained tiny Wan (a WanDiT) and its header; the file must be train.py --family wan's output."""
    from safetensors import safe_open

    from ..wan import WanDiT, wan_config_from_state_dict
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny Wan weights missing at {path}; create them with `python -m "
                                "quantsparse_core.models.tiny.train --family wan --out "
                                f"{path}` (on a CUDA GPU: the tiny HunyuanVideo took 8 minutes on an H100)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "quantsparse-tiny-wan":
        raise ValueError(f"{path} is not a tiny Wan file (format {meta.get('format')!r}); use train.py --family wan")
    config = wan_config_from_state_dict(sd)
    model = WanDiT(config, device=device, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    return model.eval(), {k: _parsed(v) for k, v in meta.items()}


def _parsed(value: str):
    """A header value as written (atomic_save_safetensors stores non-strings as JSON)."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def generate_wan(model, prompts, seeds, steps: int = DEFAULT_STEPS, shift: float = WAN_SHIFT,
                 latent_shape=LATENT_SHAPE, on_step=None) -> Generation:
    """Text-to-video with a Wan model on the tiny prompt encoder's tokens (cfg 1); one seed per prompt."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    param = next(model.parameters())
    ctx = PromptEncoder().encode_wan(list(prompts), model.config.text_dim, param.device).to(param)
    noise = torch.cat([initial_noise((1, *latent_shape), s, param.device, param.dtype) for s in seeds])
    lat = sample_wan(model, noise, ctx, flow_sigmas(steps, shift), on_step=on_step)
    return Generation(lat, LatentCodec().decode(lat.float()))

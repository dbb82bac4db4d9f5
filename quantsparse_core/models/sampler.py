"""Flow-matching Euler samplers: HunyuanVideo's (shifted sigmas, embedded guidance) and Wan's (text tokens,
optional CLIP image tokens and concatenated image channels, one or two experts).

x_sigma = (1 - sigma) * x0 + sigma * noise; the model predicts the velocity noise - x0, fed
timestep = sigma * 1000 as ComfyUI does. Each model call is told its step (StepInfo), so
attention replacements know where in the schedule they are.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .attention import StepInfo

HUNYUAN_SHIFT = 7.0  # ComfyUI's sampling shift for HunyuanVideo


def flow_sigmas(steps: int, shift: float = HUNYUAN_SHIFT) -> torch.Tensor:
    """steps + 1 sigmas from 1 to 0, warped by shift * t / (1 + (shift - 1) * t)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).to(torch.float32)


def initial_noise(shape, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Seeded noise drawn on the CPU, so a seed gives the same video on every device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _euler(noise: torch.Tensor, sigmas: torch.Tensor, concat: Optional[torch.Tensor],
           on_step: Optional[Callable[[StepInfo], None]], velocity: Callable) -> torch.Tensor:
    """The Euler loop both samplers share, as ComfyUI samples: the state and the timesteps in float32 (a bf16
    timestep 914.29 would be 916), the model's input cast to the noise's dtype per call, `concat` (an
    image-to-video model's image latent + mask channels) appended to it; velocity(input, t, step, sigma)."""
    b, dev, dt = noise.shape[0], noise.device, noise.dtype
    extra = None if concat is None else concat.to(dev, dt).expand(b, -1, -1, -1, -1)
    x = noise.float() * sigmas[0]
    for i in range(len(sigmas) - 1):
        step = StepInfo(i, sigmas)
        if on_step is not None:
            on_step(step)
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        inp = x.to(dt) if extra is None else torch.cat([x.to(dt), extra], 1)
        t = torch.full((b,), s * 1000.0, device=dev, dtype=torch.float32)
        x = x + (s_next - s) * velocity(inp, t, step, s).float()
    return x.to(dt)


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, context: torch.Tensor, pooled: Optional[torch.Tensor],
                 sigmas: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, guidance: float = 6.0,
                 on_step: Optional[Callable[[StepInfo], None]] = None,
                 concat: Optional[torch.Tensor] = None, tokens: Optional[dict] = None) -> torch.Tensor:
    """HunyuanVideo: integrate from pure noise (sigma = sigmas[0]) to sigmas[-1]; returns the final latent.
    concat: an image-to-video model's image latent + mask channels; tokens: further token inputs of the model
    (HunyuanVideo 1.5: txt_byt5, clip_fea), the same at every call."""
    dev, dt = noise.device, noise.dtype
    g = torch.full((noise.shape[0],), float(guidance), device=dev, dtype=torch.float32)
    kw = {k: v.to(dev, dt) for k, v in (tokens or {}).items()}
    return _euler(noise, sigmas, concat, on_step, lambda inp, t, step, s: model(
        inp, t, context, pooled, guidance=g, attention_mask=attention_mask, step=step, **kw))


WAN_SHIFT = 8.0  # ComfyUI's sampling shift for Wan 2.1 T2V/I2V (supported_models.WAN21_T2V)


@torch.no_grad()
def sample_wan(model, noise: torch.Tensor, context: torch.Tensor, sigmas: torch.Tensor,
               clip_fea: Optional[torch.Tensor] = None, concat: Optional[torch.Tensor] = None,
               on_step: Optional[Callable[[StepInfo], None]] = None,
               expert: Optional[Callable[[float], torch.nn.Module]] = None) -> torch.Tensor:
    """Wan: integrate the velocity (noise - x0) from sigmas[0] to sigmas[-1]. concat: I2V's mask + image-latent
    channels; expert(sigma) picks each step's model (Wan 2.2's two experts), else `model` runs every step."""
    dev, dt = noise.device, noise.dtype
    ctx = context.to(dev, dt)
    clip = None if clip_fea is None else clip_fea.to(dev, dt)
    return _euler(noise, sigmas, concat, on_step, lambda inp, t, step, s: (
        model if expert is None else expert(s))(inp, t, ctx, clip, step=step))

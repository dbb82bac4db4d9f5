"""Train the embedded tiny HunyuanVideo-architecture model (or, with --family wan, the tiny Wan model) on
procedural moving-shape videos.

    python -m quantsparse_core.models.tiny.train --steps 6000 --out quantsparse_core/models/tiny/tiny_dit.safetensors
    python -m quantsparse_core.models.tiny.train --family wan --steps 6000 \
        --out quantsparse_core/models/tiny/tiny_wan.safetensors

Runs on a CUDA GPU (bf16 autocast) or the CPU (slow). Flow-matching loss: predict noise - x0 at
x_sigma = (1 - sigma) x0 + sigma noise. With --cond-dropout p (default 0.1) a fraction p of the prompts is
replaced by the empty prompt, the unconditional input, so the model also learns the unconditional velocity
that classifier-free guidance (cfg > 1) extrapolates from; weights trained without it give black frames at
cfg 1.5-3. The EMA weights are saved in bf16 with the config, the command line and the final loss in the
safetensors header.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from .codec import LatentCodec
from ..config import get_preset
from ..hunyuan_video import HunyuanVideoDiT
from ..wan import WanDiT, get_wan_preset
from .prompts import PromptEncoder
from ..sampler import HUNYUAN_SHIFT, WAN_SHIFT
from .shapes import random_scenes, render
from ..weights import atomic_save_safetensors
from safetensors.torch import load_file

FRAMES, SIZE = 8, 128  # -> latent 16 x 8 x 32 x 32 -> 8 x 16 x 16 = 2048 video tokens


def zero_init_modulation(model: HunyuanVideoDiT) -> None:
    """adaLN-Zero: blocks start as identity, the output starts at zero (stable early training)."""
    for name, mod in model.named_modules():
        if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1")) or name == "final_layer.linear":
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)


def zero_init_wan(model: WanDiT) -> None:
    """Wan blocks start as identity (attention outputs and FFN output zero), the head's output at zero."""
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.o", "cross_attn.o", "ffn.2")) or name == "head.head":
            torch.nn.init.zeros_(mod.weight)
            torch.nn.init.zeros_(mod.bias)


def build(family: str, device):
    """(model, its config, forward(model, xt, timestep, prompts, encoder, batch) -> velocity, zero-init) of a family."""
    if family == "wan":
        config = get_wan_preset("tiny-wan")
        model = WanDiT(config, device=device)

        def forward(m, xt, t, prompts, encoder, batch):
            return m(xt, t, encoder.encode_wan(prompts, config.text_dim, device))
        return model, config, forward, zero_init_wan
    config = get_preset("tiny")
    model = HunyuanVideoDiT(config, device=device)

    def forward(m, xt, t, prompts, encoder, batch):
        ctx, mask, pooled = (x.to(device) for x in encoder.encode(prompts))
        return m(xt, t, ctx, pooled, guidance=torch.full((batch,), 6.0, device=device), attention_mask=mask)
    return model, config, forward, zero_init_modulation


def drop_prompts(prompts: list, p: float, gen: torch.Generator) -> list:
    """Each prompt replaced by "" (the unconditional input) with probability p, drawn from `gen` (CPU)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"--cond-dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return list(prompts)   # no draw: --cond-dropout 0 keeps the scene sequence of runs made before it existed
    keep = torch.rand(len(prompts), generator=gen) >= p
    return [t if k else "" for t, k in zip(prompts, keep.tolist())]


class LossWindow:
    """The last n per-step losses in one device buffer, read back only when printed: a per-step .item() stalls
    the host on the GPU. One fixed buffer, not a growing list of 0-dim tensors (2026-12-07, H100: the list
    version ran out of 80 GB at step 4,400 of a tiny-Wan run; the per-step .item() version had run 9,047)."""

    def __init__(self, device, n: int = 200):
        self.values = torch.zeros(n, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.values[self.count % len(self.values)] = loss.detach()
        self.count += 1

    def mean(self) -> float:
        return float(self.values[:min(self.count, len(self.values))].mean())


def device_memory(device) -> str:
    """Allocated / peak device memory for the progress line, so growth across steps shows early."""
    if device.type != "cuda":
        return ""
    return (f" mem {torch.cuda.memory_allocated(device) / 2**30:.2f}"
            f"/{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


def sample_sigmas(n, gen, device, shift: float = HUNYUAN_SHIFT):
    """Half uniform, half warped by the sampling shift, so every step of the schedule is trained."""
    u = torch.rand(n, generator=gen, device=device)
    shifted = shift * u / (1 + (shift - 1) * u)
    pick = torch.rand(n, generator=gen, device=device) < 0.5
    return torch.where(pick, u, shifted).clamp(1e-3, 1.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="if > 0, choose --steps from the measured speed to fit this budget")
    ap.add_argument("--init", default=None, help="continue from these weights (bf16 safetensors)")
    ap.add_argument("--family", choices=("hunyuan", "wan"), default="hunyuan",
                    help="hunyuan: the tiny HunyuanVideo (tiny preset); wan: the tiny Wan (tiny-wan preset)")
    ap.add_argument("--cond-dropout", type=float, default=0.1,
                    help="fraction of prompts trained as the empty (unconditional) prompt, for cfg > 1")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model for the training steps (fewer, fused kernels per step on a GPU; "
                         "the first step compiles for a minute or so)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    drop_prompts([], args.cond_dropout, torch.Generator())  # a bad value fails here, before any work

    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    cpu_gen = torch.Generator().manual_seed(args.seed)
    model, config, forward, zero_init = build(args.family, dev)
    shift = WAN_SHIFT if args.family == "wan" else HUNYUAN_SHIFT
    if args.init:
        model.load_state_dict({k: v.float() for k, v in load_file(args.init).items()})
    else:
        zero_init(model)
    ema = copy.deepcopy(model).requires_grad_(False)
    stepper = torch.compile(model) if args.compile else model  # shares model's parameters: EMA and saving unchanged
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    codec, encoder = LatentCodec(), PromptEncoder()
    use_amp = dev.type == "cuda"

    def lr_at(step, total):
        warm = 200
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    total, losses, t0 = args.steps, LossWindow(dev), time.time()
    step = 0
    while step < total:
        scenes = random_scenes(args.batch, cpu_gen)
        prompts = drop_prompts([s.prompt() for s in scenes], args.cond_dropout, cpu_gen)
        with torch.no_grad():
            x0 = codec.encode(render(scenes, frames=FRAMES, size=SIZE, generator=gen, device=dev))
        noise = torch.randn(x0.shape, generator=gen, device=dev)
        sig = sample_sigmas(args.batch, gen, dev, shift)
        xt = (1 - sig.view(-1, 1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1, 1) * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            v = forward(stepper, xt, sig * 1000, prompts, encoder, args.batch)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - args.ema)
        losses.add(loss)
        step += 1
        if args.minutes > 0 and step == 50:
            t50 = time.time()
        if args.minutes > 0 and step == 150:  # speed after warm-up
            per_step = (time.time() - t50) / 100
            total = max(step + 1, int((args.minutes * 60 - (time.time() - t0)) / per_step) + step)
            print(f"{per_step * 1000:.0f} ms/step -> {total} steps to fit {args.minutes} min", flush=True)
        if step % 200 == 0 or step == total:
            print(f"step {step}/{total} loss {losses.mean():.4f} "
                  f"lr {lr_at(step, total):.2e} {time.time() - t0:.0f}s{device_memory(dev)}", flush=True)

    final = losses.mean()
    meta = {
        "format": "quantsparse-tiny-wan" if args.family == "wan" else "quantsparse-tiny-dit",
        "config": config.to_dict(), "steps": step, "batch": args.batch, "cond_dropout": args.cond_dropout,
        "final_loss": round(final, 5), "seed": args.seed, "device": torch.cuda.get_device_name(dev) if use_amp else "cpu",
        "command": "python -m quantsparse_core.models.tiny.train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in
            dict(family=args.family, steps=step, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed,
                 cond_dropout=args.cond_dropout,
                 **({"init": args.init} if args.init else {}), out=args.out).items()),
        "train_seconds": round(time.time() - t0),
    }
    sd = {k: v.to(torch.bfloat16).cpu() for k, v in ema.state_dict().items()}
    atomic_save_safetensors(sd, args.out, meta)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 18's fidelity table for Wan, on the embedded tiny Wan (models/tiny: train.py --family wan):

    python -m quantsparse_core.wan_results [--device cuda] [--steps 50] [--out docs/RESULTS.md]

Rows, all against the full-precision dense tiny Wan at the same step count, the fixed prompt set and seeds of
the HunyuanVideo tables: W4A8 round-to-nearest dense; W4A8 RTN + SVG 15% without cache (the baseline the target
names); W4A8 MSAD dense; W4A8 MSAD + 15% + SSAR (QuantSparse). Target: QuantSparse at least 5 dB above RTN + SVG.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from .calib.calibrate import CalibSettings, calibrate
from .calib.wan_calibration import WanConditioning, capture_wan
from .metrics import psnr, ssim
from .models.tiny.embedded import LATENT_SHAPE, WAN_WEIGHTS, generate_wan, load_wan
from .models.tiny.evaluate import FIXED_SCENES
from .models.tiny.prompts import PromptEncoder
from .models.tiny.shapes import random_scenes
from .quant.linear import QuantLinear
from .sparse.ssar import SparseSettings, SSARAttention

TITLE = "## Wan: quantization + sparse attention (embedded tiny Wan)"
TARGET_DB = 5.0


def videos(model, prompts, steps: int, latent_shape=LATENT_SHAPE) -> torch.Tensor:
    return generate_wan(model, prompts, list(range(len(prompts))), steps=steps, latent_shape=latent_shape).videos


def wan_captures(model, samples: int, steps: int, seed: int = 0, latent_shape=LATENT_SHAPE, per_prompt: int = 4):
    """Block inputs of random procedural prompts (one prompt per `per_prompt` samples), merged over prompts."""
    n_prompts = -(-samples // per_prompt)
    scenes = random_scenes(n_prompts, torch.Generator().manual_seed(seed))
    encoder = PromptEncoder()
    merged = {}
    for j, scene in enumerate(scenes):
        cond = WanConditioning(encoder.encode_wan([scene.prompt()], model.config.text_dim))
        n = min(per_prompt, samples - j * per_prompt)
        got = capture_wan(model, cond, latent_shape, n_samples=n, steps=steps, per_trajectory=n, seed=seed + j)
        for key, items in got.items():
            merged.setdefault(key, []).extend(items)
    return merged


def compressed(model, captured, method: str, epochs: int):
    q = copy.deepcopy(model)
    calibrate(q, captured, CalibSettings(method=method, w_bits=4, a_bits=8, epochs=epochs))
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
    return q


def wan_table(device="cpu", steps: int = 50, samples: int = 20, epochs: int = 15, density: float = 0.15,
              n_prompts: int = len(FIXED_SCENES), weights=WAN_WEIGHTS, latent_shape=LATENT_SHAPE, log=print) -> list:
    """[(label, PSNR, SSIM, effective attention density, seconds)] of the table's rows."""
    model, _ = load_wan(weights, device=device)
    prompts = [s.prompt() for s in FIXED_SCENES[:n_prompts]]
    t0 = time.time()
    ref = videos(model, prompts, steps, latent_shape)
    log(f"FP dense reference: {time.time() - t0:.0f} s")
    captured = wan_captures(model, samples, steps=20, latent_shape=latent_shape)
    models = {"rtn": compressed(model, captured, "rtn", epochs), "msad": compressed(model, captured, "msad", epochs)}
    block = 64 if density < 0.2 else 128
    rows = []
    for label, m, settings in (
            ("W4A8 RTN, dense attention", "rtn", None),
            (f"W4A8 RTN + SVG {density:.0%}, no cache", "rtn",
             SparseSettings(density=density, order=0, block=block, schedule="standard")),
            ("W4A8 MSAD, dense attention", "msad", None),
            (f"QuantSparse: W4A8 MSAD + {density:.0%} + SSAR", "msad",
             SparseSettings(density=density, block=block, schedule="standard"))):
        t0 = time.time()
        fn = None if settings is None else SSARAttention(settings)
        if fn is None:
            out = videos(models[m], prompts, steps, latent_shape)
        else:
            with models[m].attention(fn):
                out = videos(models[m], prompts, steps, latent_shape)
        rows.append((label, psnr(out, ref), ssim(out, ref), 1.0 if fn is None else fn.effective_density(),
                     time.time() - t0))
        log(f"{label:<44} PSNR {rows[-1][1]:6.2f} SSIM {rows[-1][2]:.4f} density {rows[-1][3]:.3f} "
            f"({rows[-1][4]:.0f} s)")
    return rows


def margin(rows) -> float:
    """QuantSparse's PSNR above RTN + SVG without cache (the target's measure), in dB."""
    return rows[3][1] - rows[1][1]


def render(rows, device: str, steps: int, samples: int, epochs: int) -> str:
    lines = [TITLE, "",
             f"`python -m quantsparse_core.wan_results --device {device} --steps {steps}`; the fixed prompt set and "
             f"seeds of the tables above, {steps} Euler steps (shift 8), cfg 1, PSNR / SSIM against the dense "
             f"full-precision tiny Wan; calibration {samples} samples from 20-step trajectories of random prompts, "
             f"{epochs} epochs per block. Effective density: attention cost of the self-attention over the run.", "",
             "| setting | PSNR (dB) | SSIM | effective density | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {p:.2f} | {s:.4f} | {d:.3f} | {sec:.0f} |" for label, p, s, d, sec in rows]
    met = "met" if margin(rows) >= TARGET_DB else "not met"
    lines += ["", f"QuantSparse {margin(rows):+.2f} dB over RTN + SVG without cache (target +{TARGET_DB:g} dB: {met}).",
              ""]
    return "\n".join(lines)


def main(argv=None):
    from .results import replace_section
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--weights", default=str(WAN_WEIGHTS))
    ap.add_argument("--out", default="docs/RESULTS.md", help="markdown file whose Wan section is replaced ('' = print)")
    a = ap.parse_args(argv)
    rows = wan_table(a.device, a.steps, a.samples, a.epochs, weights=a.weights, log=lambda m: print(m, flush=True))
    text = render(rows, a.device, a.steps, a.samples, a.epochs)
    if a.out:
        replace_section(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

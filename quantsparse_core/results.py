"""Fidelity tables on the embedded model (writes docs/RESULTS.md).

    python -m quantsparse_core.results quant [--device cuda] [--out docs/RESULTS.md]

PSNR / SSIM of the final videos of the compressed model against the full-precision model, same
seeds, the fixed prompt set of models.tiny.evaluate, for W8A8 / W6A6 / W4A8 under every calibration method.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from .calib.calibrate import METHODS, CalibSettings, calibrate
from .calib.capture import capture_embedded
from .metrics import psnr, ssim
from .models.tiny.embedded import generate, load_embedded
from .models.tiny.evaluate import FIXED_SCENES
from .quant.linear import QuantLinear

BITS = ((8, 8), (6, 6), (4, 8))


def videos_of(model, steps):
    prompts = [s.prompt() for s in FIXED_SCENES]
    return generate(model, prompts, list(range(len(prompts))), steps=steps).videos


def record_calls(model, steps):
    """The FP model's own calls (inputs) while generating the fixed prompt set."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append((a, dict(kw))), with_kwargs=True)
    try:
        videos = videos_of(model, steps)
    finally:
        handle.remove()
    return videos, calls


@torch.no_grad()
def velocity_error(model, ref_model, calls) -> float:
    """Mean relative L2 error of one model call against the FP model on the same (FP) inputs: the
    one-step error, free of the trajectory divergence that dominates final-video PSNR."""
    errs = []
    for args, kw in calls:
        ref, out = ref_model(*args, **kw), model(*args, **kw)
        errs.append(((out - ref).norm() / ref.norm()).item())
    return sum(errs) / len(errs)


def quant_table(device, steps=16, samples=20, epochs=15, methods=METHODS, bits=BITS, log=print):
    model, _ = load_embedded(device=device)
    ref, calls = record_calls(model, steps)
    cap = capture_embedded(model, n_samples=samples, steps=20, device=device)
    rows = []
    for w, a in bits:
        for method in methods:
            t0 = time.time()
            qm = copy.deepcopy(model)
            report = calibrate(qm, cap, CalibSettings(method=method, w_bits=w, a_bits=a, epochs=epochs))
            for mod in qm.modules():
                if isinstance(mod, QuantLinear):
                    mod.freeze()
            vids = videos_of(qm, steps)
            block_mse = sum(r["quant"] for r in report.values()) / len(report)
            verr = velocity_error(qm, model, calls)
            rows.append((f"W{w}A{a}", method, psnr(vids, ref), ssim(vids, ref), verr, block_mse, time.time() - t0))
            log(f"W{w}A{a} {method:<13} PSNR {rows[-1][2]:6.2f} SSIM {rows[-1][3]:.4f} vel.err {verr:.4f} "
                f"block MSE {block_mse:.2e} ({rows[-1][-1]:.0f}s)")
    return rows


LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0)


def lambda_table(device, steps=16, samples=20, epochs=15, lambdas=LAMBDAS, bits=(4, 8), log=print):
    """MSAD with lambda_g = lambda_l swept, against block-loss-only, at one bit width."""
    model, _ = load_embedded(device=device)
    ref, calls = record_calls(model, steps)
    cap = capture_embedded(model, n_samples=samples, steps=20, device=device)
    rows = []
    for method, lam in [("block", None)] + [("msad", x) for x in lambdas]:
        t0 = time.time()
        qm = copy.deepcopy(model)
        extra = {} if lam is None else {"lambda_g": lam, "lambda_l": lam}
        report = calibrate(qm, cap, CalibSettings(method=method, w_bits=bits[0], a_bits=bits[1], epochs=epochs,
                                                  **extra))
        for mod in qm.modules():
            if isinstance(mod, QuantLinear):
                mod.freeze()
        vids = videos_of(qm, steps)
        block_mse = sum(r["quant"] for r in report.values()) / len(report)
        label = method if lam is None else f"msad lambda={lam:g}"
        rows.append((f"W{bits[0]}A{bits[1]}", label, psnr(vids, ref), ssim(vids, ref),
                     velocity_error(qm, model, calls), block_mse, time.time() - t0))
        log(f"{label:<20} PSNR {rows[-1][2]:6.2f} vel.err {rows[-1][4]:.4f} block MSE {block_mse:.2e}")
    return rows


def render_lambda(rows, device, steps, samples, epochs) -> str:
    table = render_quant(rows, device, steps, samples, epochs).split("\n", 2)[2]
    return ("## Quantization: MSAD lambda sweep (embedded tiny model)\n\n"
            f"`python -m quantsparse_core.results lambda --device {device}`; lambda_g = lambda_l, applied "
            "after auto-balancing each MSAD term to the block loss; same protocol as the quantization "
            "table:" + table.split(";", 1)[1])


def render_quant(rows, device, steps, samples, epochs) -> str:
    lines = ["## Quantization (embedded tiny model)", "",
             f"`python -m quantsparse_core.results quant --device {device}`; {len(FIXED_SCENES)} fixed prompts, "
             f"{steps} Euler steps, same seeds; calibration: {samples} samples from real trajectories, "
             f"{epochs} epochs per block. PSNR/SSIM of decoded videos against the full-precision model; "
             "velocity error = mean relative L2 error of one model call against the FP model on the FP "
             "model's own inputs along those trajectories (one-step error, no trajectory divergence); "
             "block MSE = mean over blocks of the calibrated block's output MSE on its calibration inputs.", "",
             "| bits | method | PSNR (dB) | SSIM | velocity error | block MSE | seconds |",
             "|---|---|---|---|---|---|---|"]
    for bits, method, p, s, verr, mse, sec in rows:
        lines.append(f"| {bits} | {method} | {p:.2f} | {s:.4f} | {verr:.4f} | {mse:.2e} | {sec:.0f} |")
    return "\n".join(lines) + "\n"


ORDERS = (("no cache", 0, 0), ("1st order", 1, 0), ("2nd order", 2, 0), ("2nd + SVD r16", 2, 16))
ABLATION_STEPS = 50  # the paper's schedule: ~9 refreshes per block at tau 5, not 3 as at 16 steps
SCHEDULES = ((5, 1), (5, 2), (6, 2), (8, 2), (10, 5))  # (tau, dense warm-up steps) besides the default (5, 10% = 5)


def _block_for(density: float) -> int:
    """128-token blocks (the method's size) where the tiny model can reach the density; 64 below 20%,
    because at 2,072 tokens the 128-block diagonal plus the text block already keep 17.7%."""
    return 128 if density >= 0.2 else 64


def _sparse_runs(steps: int):
    """(label, density, order, svd_rank, tau, block, steps[, warm-up steps]) of the sparse table."""
    runs = []
    for n in (steps, ABLATION_STEPS):
        runs += [(f"d={d:.0%} {name}", d, order, rank, 5, _block_for(d), n)
                 for d in (0.40, 0.25, 0.15, 0.10) for name, order, rank in ORDERS]
        runs += [(f"d=15% 2nd + SVD r16, tau={tau}", 0.15, 2, 16, tau, 64, n) for tau in (3, 4, 6)]
    return runs + _schedule_runs()


def _schedule_runs():
    """Shorter dense shares at ABLATION_STEPS (the schedules that reach the speed targets in
    docs/BENCHMARKS.md): what they cost in fidelity. (..., warm-up steps) appended."""
    return [(f"d=15% 2nd + SVD r16, tau={tau}, {w} warm-up step{'s' * (w != 1)}", 0.15, 2, 16, tau, 64, ABLATION_STEPS, w)
            for tau, w in SCHEDULES]


def sparse_table(device, steps=16, runs=None, quant_bits=((4, 8), (6, 6)), samples=20, epochs=15,
                 log=print, quant_only=False):
    """Sparse attention + SSAR on the FP model, then combined with block-calibrated quantization;
    every setting at `steps` and at ABLATION_STEPS sampling steps."""
    from .sparse.ssar import SparseSettings, SSARAttention

    model, _ = load_embedded(device=device)
    refs = {}
    rows = []

    def run(m, label, density, order, rank, tau, block, n, warmup=None):
        if n not in refs:
            refs[n] = videos_of(model, n)
        t0 = time.time()
        fn = SSARAttention(SparseSettings(density=density, order=order, svd_rank=rank, tau=tau, block=block,
                                          warmup_steps=warmup))
        with m.attention(fn):
            vids = videos_of(m, n)
        rows.append((n, block, label, psnr(vids, refs[n]), ssim(vids, refs[n]), fn.effective_density(),
                     time.time() - t0))
        log(f"{n:>2} steps, block {block:>3}: {label:<40} PSNR {rows[-1][3]:6.2f} SSIM {rows[-1][4]:.4f} "
            f"eff. density {rows[-1][5]:.3f} ({rows[-1][6]:.0f}s)")

    for args in ([] if quant_only else runs if runs is not None else _sparse_runs(steps)):
        run(model, *args)
    if quant_bits:
        cap = capture_embedded(model, n_samples=samples, steps=20, device=device)
        for w, a in quant_bits:
            qm = copy.deepcopy(model)
            calibrate(qm, cap, CalibSettings(method="block", w_bits=w, a_bits=a, epochs=epochs))
            for mod in qm.modules():
                if isinstance(mod, QuantLinear):
                    mod.freeze()
            for n in (steps, ABLATION_STEPS):
                run(qm, f"W{w}A{a} (block calib) + d=15% 2nd + SVD r16", 0.15, 2, 16, 5, 64, n)
    return rows


def render_sparse(rows, device, steps) -> str:
    lines = ["## Sparse attention + SSAR (embedded tiny model)", "",
             f"`python -m quantsparse_core.results sparse --device {device}`; same prompts and seeds as above, "
             f"every setting at {steps} and at {ABLATION_STEPS} Euler steps; PSNR/SSIM against the dense "
             "full-precision model at the same step count. Effective density = attention cost of the joint "
             "blocks relative to dense over the run (refresh and warm-up calls count as 1; the token refiner "
             "is not counted). Block = mask block size in tokens (64 below 20% density: see below).", ""]
    for n in sorted({r[0] for r in rows}):
        lines += [f"### {n} steps", "",
                  "| setting | block | PSNR (dB) | SSIM | effective density | seconds |", "|---|---|---|---|---|---|"]
        for steps_, block, label, p, s, eff, sec in rows:
            if steps_ == n:
                lines.append(f"| {label} | {block} | {p:.2f} | {s:.4f} | {eff:.3f} | "
                             f"{'-' if sec is None else f'{sec:.0f}'} |")
        lines.append("")
    return "\n".join(lines)


def replace_section(path, section: str) -> None:
    """Put `section` (starting with '## Title') into the markdown file at `path`, replacing the
    section of the same title (and its old commentary) and keeping the others."""
    from pathlib import Path

    title = section.split("\n", 1)[0]
    p = Path(path)
    old = p.read_text() if p.exists() else "# Fidelity results\n"
    head, *parts = old.split("\n## ")
    parts = ["## " + x for x in parts]
    kept = [x.rstrip("\n") + "\n" for x in parts if x.split("\n", 1)[0] != title]
    body = [x for x in kept if x.split("\n", 1)[0] < title] + [section] + \
        [x for x in kept if x.split("\n", 1)[0] > title]
    tmp = p.with_suffix(".tmp")
    tmp.write_text(head.rstrip("\n") + "\n\n" + "\n".join(body))
    tmp.replace(p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=["quant", "sparse", "lambda"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="docs/RESULTS.md")
    ap.add_argument("--quant-only", action="store_true",
                    help="sparse table: only the rows combined with quantization (print them; no file written)")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.table == "quant":
        rows = quant_table(args.device, args.steps, args.samples, args.epochs, log=log)
        text = render_quant(rows, args.device, args.steps, args.samples, args.epochs)
    elif args.table == "lambda":
        rows = lambda_table(args.device, args.steps, args.samples, args.epochs, log=log)
        text = render_lambda(rows, args.device, args.steps, args.samples, args.epochs)
    else:
        rows = sparse_table(args.device, args.steps, samples=args.samples, epochs=args.epochs, log=log,
                            quant_only=args.quant_only)
        text = render_sparse(rows, args.device, args.steps)
        if args.quant_only:
            print(text)
            return 0
    replace_section(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

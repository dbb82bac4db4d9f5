"""Command line: `python -m quantsparse_core demo ...` (what `./run demo` calls) shows the dense tiny
model and QuantSparse (W4A8 + sparse attention with SSAR) side by side, with a table of what the
compression costs and saves (the work is in demo.py)."""
from __future__ import annotations

import argparse
import sys
import time

import torch


def _progress(total: int, label: str):
    """on_step callback drawing a progress bar on stderr (on_step runs before each step)."""
    start = time.time()

    def on_step(step):
        done = step.index + 1
        bar = "#" * (20 * done // total)
        end = "\n" if done == total else ""
        print(f"\r{label} [{bar:<20}] step {done}/{total} {time.time() - start:5.1f}s", end=end,
              file=sys.stderr, flush=True)
    return on_step


def _log(*args, **kwargs):
    print(*args, file=sys.stderr, flush=True, **kwargs)


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


COLUMNS = ("model", "PSNR vs dense (dB)", "SSIM vs dense", "storage (MB)", "storage ratio", "mask density",
           "effective density", "s / step", "analyser: color / direction")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def result_rows(r) -> list:
    """The comparison table of a DemoResult: a header row, dense, QuantSparse."""
    s = r.settings
    found = lambda run: f"{run.found['color']} / {run.found['direction']}"  # noqa: E731
    dense = ("dense (bf16 storage, fp32 compute)", "reference", "reference", _mb(r.dense_bytes), "1.00x",
             "100%", "100%", f"{r.dense.step_seconds:.3f}", found(r.dense))
    quant = (f"QuantSparse (W4A8 {s.calib_method} + SSAR at {s.density:.0%})", f"{r.psnr:.2f}", f"{r.ssim:.4f}",
             _mb(r.compressed_bytes), f"{r.storage_ratio:.2f}x", f"{r.mask_density:.1%}",
             f"{r.effective_density:.1%}", f"{r.compressed.step_seconds:.3f}", found(r.compressed))
    return [COLUMNS, dense, quant]


def _asked(prompt: str) -> str:
    from .models.tiny.prompts import Scene
    try:
        scene = Scene.parse(prompt)
    except ValueError:
        return "(prompt outside the demo grammar)"
    return f"{scene.color} / {scene.direction}"


def _speed_note(cuda: bool) -> str:
    if cuda:
        return ("speed: this tiny model (2,048 video tokens, 4 blocks) is too small for the kernels to pay off: "
                "launches and the sparse-attention bookkeeping dominate; the speed-ups are at HunyuanVideo "
                "scale (720p, 119k tokens): see docs/BENCHMARKS.md")
    return ("speed: on a CPU the compressed path runs the PyTorch reference code (emulated integer GEMMs, "
            "block-sparse attention without a fused kernel), so it can be slower than dense; the speed-ups "
            "need a CUDA GPU with Triton: see docs/BENCHMARKS.md")


def report(r) -> str:
    """The table and the lines that say how to read it."""
    s = r.settings
    sp = s.sparse_settings()
    cuda = s.device.startswith("cuda")
    lb16, lq = r.linears_bytes
    return "\n".join([
        f"prompt: {s.prompt!r}  seed: {s.seed}  steps: {s.steps}  device: {s.device}  asked: {_asked(s.prompt)}",
        _table(result_rows(r)),
        f"calibration: W4A8, {s.calib_method}, {s.calib_samples} samples from {s.calib_steps}-step trajectories, "
        f"{s.calib_epochs} epochs per block: {r.cache_status} ({r.cache})",
        f"sparse attention: SVG block masks at {s.density:.0%} requested, SSAR refresh every {sp.tau} steps, "
        f"second order with rank-{sp.svd_rank} SVD; mask density = kept fraction on the reuse steps; effective "
        "density = attention cost of the joint blocks relative to dense over the whole run (dense warm-up "
        "steps, the dense first block and refresh steps count as 1)",
        "storage: tensor bytes of the compressed checkpoint vs the DiT's state dict in bf16; the quantized "
        f"linears alone: {_mb(lb16)} -> {_mb(lq)} MB ({lb16 / lq:.2f}x); the embedders, token refiner and final "
        f"layer stay bf16 by policy ({1 - lb16 / r.dense_bytes:.0%} of this tiny model's bytes)",
        "s / step: mean wall-clock time of one DiT call per denoising step"
        + (" (after one untimed warm-up run)" if cuda else "")
        + f"; whole generations: dense {r.dense.seconds:.1f} s, QuantSparse {r.compressed.seconds:.1f} s",
        _speed_note(cuda),
        "outputs: " + ", ".join(str(p) for p in r.outputs) + " (dense left / top, QuantSparse right / bottom)",
    ])


def cmd_demo(args) -> int:
    from .demo import DemoSettings, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = DemoSettings(prompt=args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance,
                            density=args.density, device=device, out=args.out, recalibrate=args.recalibrate,
                            calib_method=args.calib_method, calib_samples=args.calib_samples,
                            calib_epochs=args.calib_epochs, calib_steps=args.calib_steps)
    result = run_demo(settings, log=_log, progress=_progress)
    print(report(result))
    return 0


def _demo_parser(sub) -> None:
    from .calib.calibrate import METHODS
    from .demo import DemoSettings

    D = DemoSettings()  # the defaults live in one place
    d = sub.add_parser("demo", help="dense tiny model vs QuantSparse (W4A8 + sparse attention), side by side")
    d.add_argument("--prompt", default=D.prompt)
    d.add_argument("--seed", type=int, default=D.seed)
    d.add_argument("--steps", type=int, default=D.steps, help=f"denoising steps (default {D.steps}; SSAR refreshes "
                   "every 5)")
    d.add_argument("--guidance", type=float, default=D.guidance)
    d.add_argument("--density", type=float, default=D.density, help=f"kept fraction of attention on the sparse "
                   f"steps (default {D.density}, as the tiny ComfyUI workflow)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--out", default=str(D.out), help="folder for the outputs and the calibration cache (cache/)")
    d.add_argument("--recalibrate", action="store_true", help="calibrate again even if a cached calibration exists")
    d.add_argument("--calib-method", default=D.calib_method, choices=METHODS,
                   help=f"calibration method (default {D.calib_method})")
    d.add_argument("--calib-samples", type=int, default=D.calib_samples,
                   help=f"calibration samples (default {D.calib_samples})")
    d.add_argument("--calib-epochs", type=int, default=D.calib_epochs,
                   help=f"calibration epochs per block (default {D.calib_epochs})")
    d.add_argument("--calib-steps", type=int, default=D.calib_steps,
                   help=f"steps of the trajectories the calibration samples come from (default {D.calib_steps})")
    d.set_defaults(func=cmd_demo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantsparse_core", description="QuantSparse command line")
    sub = ap.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m quantsparse_core demo ...` generates a video with the embedded model."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _progress(total: int, label: str):
    start = time.time()

    def on_step(step):
        done = step.index + 1
        bar = "#" * (20 * done // total)
        print(f"\r{label} [{bar:<20}] step {done}/{total} {time.time() - start:5.1f}s", end="",
              file=sys.stderr, flush=True)
        if done == total:
            print(file=sys.stderr)
    return on_step


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from .models.embedded import generate, load_embedded
    from .models.prompts import Scene
    from .models.shapes import analyse
    from .png import strip, to_uint8, write_apng, write_png

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_embedded(device=device)
    out = Path(args.out)
    t0 = time.time()
    gen = generate(model, [args.prompt], [args.seed], steps=args.steps, guidance=args.guidance,
                   on_step=_progress(args.steps, "dense fp32"))
    seconds = time.time() - t0
    frames = to_uint8(gen.videos[0].permute(1, 2, 3, 0))
    write_png(out / "demo_strip.png", strip(frames))
    write_apng(out / "demo.png", frames)
    found = analyse(gen.videos[0])
    try:
        scene = Scene.parse(args.prompt)
        asked = f"{scene.color} / {scene.direction}"
    except ValueError:
        asked = "(prompt outside the demo grammar)"
    rows = [("model", "steps", "seconds", "asked color / direction", "analyser found", "outputs"),
            (f"tiny DiT (training loss {meta.get('final_loss', '?')})", args.steps, f"{seconds:.1f}", asked,
             f"{found['color']} / {found['direction']}", f"{out / 'demo.png'}, {out / 'demo_strip.png'}")]
    print(f"prompt: {args.prompt!r}  seed: {args.seed}  device: {device}")
    print(_table(rows))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantsparse_core", description="QuantSparse command line")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a video with the embedded tiny model")
    demo.add_argument("--prompt", default="a red circle moving right slowly on a black background")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--guidance", type=float, default=6.0)
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--out", default="out/demo", help="folder for demo.png (animated) and demo_strip.png")
    demo.set_defaults(func=cmd_demo)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

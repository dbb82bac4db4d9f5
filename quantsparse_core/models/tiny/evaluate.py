"""Has the embedded model learned its task? Generate for a fixed prompt set and analyse the videos.

    python -m quantsparse_core.models.tiny.evaluate [--weights FILE] [--steps 16] [--device cuda]
    python -m quantsparse_core.models.tiny.evaluate --family wan [--weights FILE]   # the tiny Wan
"""
from __future__ import annotations

import argparse

import torch

from .embedded import WAN_WEIGHTS, generate, generate_wan, load_embedded, load_wan
from .prompts import Scene
from .shapes import analyse, agrees
from ..weights import load_dit

# Every color, direction, shape, speed and background appears at least once.
FIXED_SCENES = [
    Scene("red", "circle", "right", "slowly", "black"),
    Scene("green", "square", "left", "quickly", "white"),
    Scene("blue", "triangle", "up", "slowly", "gray"),
    Scene("yellow", "circle", "down", "quickly", "black"),
    Scene("magenta", "square", "right", "quickly", "gray"),
    Scene("cyan", "triangle", "left", "slowly", "black"),
    Scene("orange", "circle", "up", "quickly", "white"),
    Scene("red", "square", "down", "slowly", "gray"),
    Scene("blue", "circle", "left", "quickly", "white"),
    Scene("green", "triangle", "right", "slowly", "black"),
]


def prompt_agreement(model, scenes=FIXED_SCENES, steps: int = 16, seed0: int = 0, batch: int = 5, keep=None,
                     sample=generate, cfg: float = 1.0):
    """Fraction of generated videos whose analysed color and direction match the prompt, and details.
    sample: embedded.generate (the tiny HunyuanVideo) or embedded.generate_wan (the tiny Wan); cfg > 1
    (tiny HunyuanVideo): classifier-free guidance against the empty prompt."""
    rows = []
    kw = {} if cfg == 1.0 else {"cfg": cfg}
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        gen = sample(model, [s.prompt() for s in chunk], [seed0 + i + j for j in range(len(chunk))], steps=steps,
                     **kw)
        for s, video in zip(chunk, gen.videos):
            found = analyse(video)
            rows.append((s, found, agrees(video, s)))
            if keep is not None:
                keep.append(video)
    return sum(ok for *_, ok in rows) / len(rows), rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--random", type=int, default=0, help="also score this many random scenes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--strip", default=None, help="write the fixed set's videos as one PNG (a row each)")
    ap.add_argument("--family", choices=("hunyuan", "wan"), default="hunyuan")
    ap.add_argument("--cfg", type=float, default=1.0,
                    help="classifier-free guidance scale (tiny HunyuanVideo; needs weights trained with "
                         "--cond-dropout > 0)")
    args = ap.parse_args(argv)
    if args.cfg != 1.0 and args.family == "wan":
        ap.error("--cfg is for the tiny HunyuanVideo; the tiny Wan samples at cfg 1")
    if args.family == "wan":
        model, sample = load_wan(args.weights or WAN_WEIGHTS, device=args.device)[0], generate_wan
    else:
        model = load_dit(args.weights, device=args.device)[0] if args.weights else load_embedded(args.device)[0]
        sample = generate
    videos = []
    score, rows = prompt_agreement(model, steps=args.steps, keep=videos, sample=sample, cfg=args.cfg)
    if args.strip:
        from ...png import strip, to_uint8, write_png
        import numpy as np
        write_png(args.strip, np.concatenate([strip(to_uint8(v.permute(1, 2, 3, 0))) for v in videos], axis=0))
    for (s, found, ok), video in zip(rows, videos):
        print(f"{'ok ' if ok else 'BAD'} {s.prompt():<60} -> {found['color']:>8} {found['direction']:>6}"
              f"  mean {float(video.mean()):.2f}")
    print(f"fixed set agreement: {score:.0%}")
    if args.random:
        from .shapes import random_scenes
        scenes = random_scenes(args.random, torch.Generator().manual_seed(1234))
        score_r, _ = prompt_agreement(model, scenes, steps=args.steps, seed0=1000, batch=25, sample=sample,
                                      cfg=args.cfg)
        print(f"random set agreement ({args.random} scenes): {score_r:.0%}")


if __name__ == "__main__":
    main()

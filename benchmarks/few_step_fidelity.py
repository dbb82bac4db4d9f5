"""Which sparse-attention schedule pays at 4-8 sampling steps? Fidelity and attention cost on the
embedded tiny model, at each step count, for every candidate schedule.

    python benchmarks/few_step_fidelity.py [--steps 4 8 50] [--prompts 3] [--density 0.15]
        [--out benchmarks/results/<date>_few_step_fidelity_tiny_cpu.json] [--doc docs/RESULTS.md]

Rows per step count, all against the full-precision dense video of the same prompt, seed and step
count (PSNR / SSIM as docs/RESULTS.md's tables): the W4A8 model dense (the quantization floor), then
W4A8 + sparse attention under each schedule: standard (dense warm-up 10%, refresh every 5 steps,
second order + SVD r16), few-step (refresh from step 0 every other step, first order), the same with
second order, and sparse-only (dense first step, a fresh SVG mask every step, no residual). The W4A8
model is the demo's (quantsparse_core.demo: MSAD, 8 samples x 5 epochs, cached under out/demo/cache/).
Attention cost = SSARAttention.attention_cost(): all attention arithmetic of the joint blocks as a
fraction of dense, counted from the masks' densities (refresh sparse passes and mask selection
included). The prompts are the first --prompts of the fixed set (models/tiny/evaluate.py), seeds 0..n-1,
one prompt per generation.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsparse_core.demo import DemoSettings, compressed_model  # noqa: E402
from quantsparse_core.metrics import psnr, ssim  # noqa: E402
from quantsparse_core.models.tiny.embedded import generate, load_embedded  # noqa: E402
from quantsparse_core.models.tiny.evaluate import FIXED_SCENES  # noqa: E402
from quantsparse_core.results import _block_for, replace_section  # noqa: E402
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention  # noqa: E402

TITLE = "## Sparse attention: few-step sampling (embedded tiny model)"
COLUMNS = ["steps", "setting", "schedule", "PSNR (dB)", "SSIM", "attention cost", "effective density",
           "dense / sparse calls", "refreshes", "seconds"]


def candidates(density: float) -> list:
    """(label, SparseSettings or None for dense, whether it is a schedule preset as "auto" runs it) of
    the measured rows; block size as the sparse table's."""
    base = dict(density=density, block=_block_for(density))
    return [
        ("W4A8 dense", None, False),
        ("W4A8 + standard", SparseSettings(schedule="standard", **base), True),
        ("W4A8 + few-step (tau 2, 1st order)", SparseSettings(schedule="few-step", **base), True),
        ("W4A8 + tau 2 from step 0, 2nd order + SVD r16",
         SparseSettings(schedule="standard", warmup_steps=0, tau=2, **base), False),
        ("W4A8 + sparse-only (no residual)", SparseSettings(schedule="sparse-only", **base), True),
        # issue 20: the dense passes (warm-up steps, first blocks, refreshes) with INT8 Q.K^T
        ("W4A8 dense, INT8 attention", SparseSettings(schedule="standard", warmup_steps=10 ** 6,
                                                      int8_attention=True, **base), False),
        ("W4A8 + standard, INT8 dense passes", SparseSettings(schedule="standard", int8_attention=True, **base), False),
        ("W4A8 + few-step, INT8 dense passes", SparseSettings(schedule="few-step", int8_attention=True, **base), False),
        # every pass, sparse and dense, on the quantised block-sparse kernel (SparseSettings.attention_precision)
        ("W4A8 + standard, INT8 attention (all passes)",
         SparseSettings(schedule="standard", attention_precision="int8", **base), False),
        ("W4A8 + standard, INT8 Q.K + FP8 P.V (all passes)",
         SparseSettings(schedule="standard", attention_precision="int8-fp8", **base), False),
        ("W4A8 + few-step, INT8 Q.K + FP8 P.V (all passes)",
         SparseSettings(schedule="few-step", attention_precision="int8-fp8", **base), False),
    ]


def videos(model, prompts, steps: int) -> torch.Tensor:
    """[N, 3, F, H, W]: one generation per prompt (seed = its index)."""
    return torch.cat([generate(model, [p], [i], steps=steps).videos for i, p in enumerate(prompts)])


def measure(steps_list, n_prompts: int, density: float, only=None, log=print) -> dict:
    prompts = [s.prompt() for s in FIXED_SCENES[:n_prompts]]
    fp, _ = load_embedded()
    qmodel, cache, status = compressed_model(DemoSettings(), log)
    log(f"W4A8 model: {cache} ({status})")
    auto = SparseSettings(density=density)
    rows = []
    for n in steps_list:
        t0 = time.time()
        ref = videos(fp, prompts, n)
        log(f"{n:>3} steps  FP dense reference ({time.time() - t0:.0f} s)")
        for label, settings, preset in candidates(density):
            if only is not None and label not in only:
                continue
            t0 = time.time()
            fn = None if settings is None else SSARAttention(settings)
            if fn is None:
                out = videos(qmodel, prompts, n)
            else:
                with qmodel.attention(fn):
                    out = videos(qmodel, prompts, n)
            row = dict(steps=n, setting=label, preset=preset, schedule=None if settings is None else settings.resolved_schedule(n),
                       kinds=None if settings is None else settings.plan(n).kinds(),
                       psnr=psnr(out, ref), ssim=ssim(out, ref),
                       attention_cost=1.0 if fn is None else fn.attention_cost(),
                       effective_density=1.0 if fn is None else fn.effective_density(),
                       stats=None if fn is None else {k: float(v) for k, v in fn.stats.items()},
                       seconds=time.time() - t0)
            rows.append(row)
            log(f"{n:>3} steps  {label:<48} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.4f}  "
                f"cost {row['attention_cost']:.3f}  ({row['seconds']:.0f} s)")
    return dict(prompts=prompts, seeds=list(range(n_prompts)), rows=rows,
                auto={str(n): auto.resolved_schedule(n) for n in steps_list},
                auto_threshold=auto.few_step_max, calibration=status)


def _calls(row) -> str:
    s = row["stats"]
    return "all dense" if s is None else f"{int(s['dense'])} / {int(s['sparse'])}"


def table_rows(res) -> list:
    out = []
    for r in res["rows"]:
        auto = " (auto)" if r["preset"] and r["schedule"] == res["auto"][str(r["steps"])] else ""
        out.append([r["steps"], r["setting"] + auto, r["schedule"] or "-", round(r["psnr"], 2), round(r["ssim"], 4),
                    round(r["attention_cost"], 3), round(r["effective_density"], 3), _calls(r),
                    0 if r["stats"] is None else int(r["stats"]["refresh"]), round(r["seconds"])])
    return out


def render(res, command: str, date: str) -> str:
    lines = [TITLE, "",
             f"`{command}` ({date}, {res['device']}); {len(res['prompts'])} prompts of the fixed set (seeds "
             f"0-{len(res['prompts']) - 1}), each step count against the full-precision dense model at the same "
             f"step count; W4A8 = the demo's MSAD calibration; density {res['density']:.0%} "
             f"({res['block']}-token blocks), 1 dense first joint block. Attention cost = all attention "
             "arithmetic of the joint blocks as a fraction of dense (refresh sparse passes and SVG mask "
             "selection included); effective density = the older measure without them. "
             "(auto) marks the row `schedule=\"auto\"` runs at that step count.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows(res)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 50])
    ap.add_argument("--prompts", type=int, default=3, help=f"first N of the {len(FIXED_SCENES)} fixed prompts")
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                    help="measure only these rows (labels as printed, e.g. 'W4A8 + standard')")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>_few_step_fidelity_tiny_cpu.json)")
    ap.add_argument("--doc", default=None, help="also put the table into this markdown file (docs/RESULTS.md)")
    a = ap.parse_args(argv)
    if not 1 <= a.prompts <= len(FIXED_SCENES):
        ap.error(f"--prompts must be 1-{len(FIXED_SCENES)}")
    torch.set_num_threads(a.threads)
    now = datetime.datetime.now(datetime.timezone.utc)
    date = now.strftime("%Y-%m-%d")
    command = "python benchmarks/few_step_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    labels = [c[0] for c in candidates(a.density)]
    if a.only is not None and set(a.only) - set(labels):
        ap.error(f"unknown rows {sorted(set(a.only) - set(labels))}; the rows are {labels}")
    res = measure(a.steps, a.prompts, a.density, a.only, log=lambda m, **kw: print(m, flush=True, **kw))
    res.update(device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               density=a.density, block=_block_for(a.density))
    text = render(res, command.strip(), date)
    data = dict(run="few-step fidelity, tiny model, CPU", date=date, time_utc=now.strftime("%H:%M"),
                versions=dict(torch=torch.__version__, python=platform.python_version()),
                command=command.strip(), seconds=round(time.time() - t0),
                tables=[dict(title=TITLE[3:], columns=COLUMNS, rows=table_rows(res))], **res)
    out = Path(a.out or f"benchmarks/results/{date}_few_step_fidelity_tiny_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    if a.doc:
        replace_section(a.doc, text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

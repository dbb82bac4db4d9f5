#!/usr/bin/env python
"""Where a streaming-calibration training step's time goes: one 13B double and one single block.

    python benchmarks/dev_profile_calib.py [--tokens 30466] [--samples 4] [--steps 8] [--disk capture]
        [--out benchmarks/results/dev_profile_calib.json]
    python benchmarks/dev_profile_calib.py --preset test --tokens 64 --samples 2 --steps 2   # CPU smoke

Per block kind: random bf16 weights (calibration_streaming.RandomSource) and the quantized copy
streaming.py makes, random inputs / FP targets / MSAD targets for --samples samples in TensorStores
(--disk: none, the capture (as a calibration's first block), or all of them on disk), then
stream_train.train_block's own loop (MSAD, bf16 autocast on CUDA) for --steps steps in two modes:
  after   the loop as it is (prefetch.py: reads and copies run ahead, no per-step sync);
  before  samples read and copied when used (stream_train.PREFETCH off) plus what the loop did per
          step before the prefetcher: a host sync (the loss read-back), a full read of the capture
          entry (for vec and mask) and fresh vec / mask tensors (one more sync in attention.allowed_keys).
Prints per step the wall time (CUDA events at the step starts) and host time, the GPU kernel time
per step under torch.profiler (the difference is where the GPU waited), the time by kernel family,
the top kernels, the CUDA runtime calls on the host, and (CUDA) every host sync torch reports in
one epoch (torch.cuda.set_sync_debug_mode). A development tool: the timings that count are
calibration_streaming.py's.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
_alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
import dev_profile_step as dps  # noqa: E402  (its gpu_benchmark import sets the allocator config ...)
if _alloc_conf is None:  # ... which the calibration's own process does not use: keep the default allocator
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
else:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _alloc_conf

import torch  # noqa: E402

from calibration_streaming import H200_BF16_PEAK, RandomSource, parse_latent  # noqa: E402
from quantsparse_core.calib import stream_train  # noqa: E402
from quantsparse_core.calib.calibrate import CalibSettings  # noqa: E402
from quantsparse_core.calib.stream_budget import block_params  # noqa: E402
from quantsparse_core.calib.stream_capture import Capture  # noqa: E402
from quantsparse_core.calib.streaming import quantized_copy  # noqa: E402
from quantsparse_core.calib.tensor_store import TensorStore  # noqa: E402
from quantsparse_core.models.config import get_preset  # noqa: E402
from quantsparse_core.models.layers import rope_table  # noqa: E402
from quantsparse_core.quant.policy import default_policy  # noqa: E402

MARKER = "spin_kernel"   # torch.cuda._sleep's kernel: launched at each profiled step's start
# Calibration-specific kernel families, checked before dev_profile_step's.
CALIB_FAMILIES = [
    ("host<->device copies", r"^Memcpy|^Memset"),
    ("AdamW (multi-tensor)", r"multi_tensor_apply|[Aa]dam"),
    ("softmax (MSAD maps, fp32)", r"softmax|Softmax"),
    ("index / gather / scatter", r"index|gather|scatter|take"),
]


def family(name: str) -> str:
    for fam, pat in CALIB_FAMILIES:
        if re.search(pat, name):
            return fam
    return dps.family(name)


# -- random data in TensorStores, shaped as streaming.py stores them --------------------------------------
def _store(kind: str, disk: str, folder: Path, tag: str) -> TensorStore:
    on_disk = disk == "all" or (disk == "capture" and kind == "capture")
    return TensorStore(folder / f"{tag}.bin") if on_disk else TensorStore(pin=True)


def make_capture(source, grid, txt_len, samples, dtype, dev, disk, folder) -> Capture:
    """A capture of `samples` random block-0 inputs (img, txt, vec, text mask) at `grid` video tokens."""
    config = source.config
    c = config.hidden_size
    n_img = grid[0] * grid[1] * grid[2]
    g = torch.Generator(dev).manual_seed(11)
    store = _store("capture", disk, folder, "capture")
    for _ in range(samples):
        store.append((torch.randn(1, n_img, c, generator=g, device=dev, dtype=dtype),
                      torch.randn(1, txt_len, c, generator=g, device=dev, dtype=dtype),
                      torch.randn(1, c, generator=g, device=dev, dtype=dtype),
                      torch.zeros(1, 1, txt_len + n_img, device=dev, dtype=dtype)))   # all text tokens real
    rope = rope_table(source.skeleton.positions(grid, 1, txt_len, "cpu"), config.rope_axes, config.rope_theta)
    meta = [{"txt_len": txt_len, "grid": list(grid), "rope": 0, "n_hidden": 2, "step": None, "sigmas": None}
            for _ in range(samples)]
    return Capture(store, [rope], meta)


def make_block_data(cap, config, kind, settings, dtype, dev, disk, folder):
    """(BlockData, MSAD store, stores to close): random FP targets and MSAD targets for each sample; a
    single block gets its own random (x,) inputs."""
    c, heads = config.hidden_size, config.num_heads
    m = cap.meta[0]
    txt_len, n_img = m["txt_len"], m["grid"][0] * m["grid"][1] * m["grid"][2]
    tokens = txt_len + n_img
    g = torch.Generator(dev).manual_seed(13 if kind == "double" else 17)
    inputs = cap.store
    opened = []
    if kind == "single":
        inputs = _store(kind, disk, folder, "inputs-single")
        opened.append(inputs)
    targets, msad = _store(kind, disk, folder, f"targets-{kind}"), _store(kind, disk, folder, f"msad-{kind}")
    opened += [targets, msad]
    k, n_pool = min(settings.top_k, tokens), math.ceil(tokens / settings.stride)
    for _ in range(len(cap)):
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=dev, dtype=dtype)  # noqa: E731
        if kind == "single":
            inputs.append((rnd(1, tokens, c),))
        targets.append((rnd(1, n_img, c), rnd(1, txt_len, c)) if kind == "double" else (rnd(1, tokens, c),))
        glob = torch.softmax(torch.randn(1, heads, n_pool, n_pool, generator=g, device=dev), -1).to(dtype)
        idx = torch.randperm(tokens, generator=g, device=dev)[:k].view(1, k)
        loc = torch.softmax(rnd(1, heads, k, tokens).float(), -1).to(dtype)
        msad.append((glob, idx, loc))
        del glob, idx, loc
    data = stream_train.BlockData(cap, inputs, kind, 0, 1, dev, dtype)
    data.targets = targets
    return data, msad, opened


# -- one run of the training loop --------------------------------------------------------------------
def run_steps(data, fp, q0, settings, msad, amp, mode, profile=False, sync_debug=False) -> dict:
    """train_block on a fresh copy of q0 for settings.epochs x samples steps in `mode`; per-step times."""
    dev = data.device
    cuda = dev.type == "cuda"
    q = copy.deepcopy(q0)
    stream_train.PREFETCH = mode == "after"
    starts, host = [], []

    def hook(i):
        if mode == "before":
            if cuda and i:
                torch.cuda.synchronize(dev)          # the old loop's per-step loss read-back
            data._context = None                     # fresh vec / mask tensors every step, as before
            data.capture.store.get(i % len(data))    # the whole capture entry was read for vec and mask
        host.append(time.perf_counter())
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            starts.append(ev)
            if profile:
                torch.cuda._sleep(1)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    prof = None
    caught = []
    with contextlib.ExitStack() as stack:
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            prof = stack.enter_context(tprofile(activities=acts))
        if sync_debug and cuda:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode(1)
            stack.callback(torch.cuda.set_sync_debug_mode, 0)
        t0 = time.perf_counter()
        final = stream_train.train_block(fp, q, data, settings, 0, 1, None, msad, amp, step_hook=hook)
        if cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
    host.append(t0 + wall)
    steps = len(host) - 1
    step_s = ([starts[i].elapsed_time(starts[i + 1] if i + 1 < steps else end) / 1e3 for i in range(steps)]
              if cuda else [host[i + 1] - host[i] for i in range(steps)])
    out = {"mode": mode, "steps": steps, "wall_s": wall, "step_s": step_s,
           "host_s": [host[i + 1] - host[i] for i in range(steps)],
           "mean_step_s": sum(step_s[1:] or step_s) / len(step_s[1:] or step_s),
           "peak_gpu_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0,
           "final_losses": final}
    if prof is not None:
        out["profile"] = analyse(prof, cuda, steps)
    if sync_debug and cuda:
        where = defaultdict(int)
        for w in caught:
            where[f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}"] += 1
        out["syncs"] = dict(sorted(where.items(), key=lambda x: -x[1]))
    del q
    return out


def analyse(prof, cuda: bool, steps: int) -> dict:
    """Kernel times (CUDA; on the CPU: aten ops' own CPU time) by name, per step (between the markers),
    and the CUDA runtime calls on the host."""
    kern, count, runtime, rcount = defaultdict(float), defaultdict(int), defaultdict(float), defaultdict(int)
    marks, spans = [], []
    main = threading.get_native_id()
    for ev in prof.events():
        dev_ev = ev.device_type == torch.autograd.DeviceType.CUDA
        if cuda and dev_ev:
            if getattr(ev, "is_user_annotation", False):
                continue
            if MARKER in ev.name:
                marks.append(ev.time_range.start)
                continue
            ms = ev.time_range.elapsed_us() / 1e3
            kern[ev.name] += ms
            count[ev.name] += 1
            spans.append((ev.time_range.start, ev.time_range.end, ms, ev.name.startswith(("Memcpy", "Memset"))))
        elif not dev_ev:
            if ev.name.startswith("cuda"):
                key = ev.name + ("" if ev.thread == main else " (other thread)")
                runtime[key] += ev.time_range.elapsed_us() / 1e3
                rcount[key] += 1
            elif not cuda and ev.name.startswith("aten::"):
                kern[ev.name] += ev.self_cpu_time_total / 1e3
                count[ev.name] += 1
    per_step = []
    marks.sort()
    if cuda and len(marks) == steps and spans:
        bounds = marks + [max(e for _, e, _, _ in spans)]
        for i in range(steps):
            inside = [(ms, cp) for s, _, ms, cp in spans if bounds[i] <= s < bounds[i + 1]]
            per_step.append({"span_ms": (bounds[i + 1] - bounds[i]) / 1e3,
                             "busy_ms": sum(ms for ms, cp in inside if not cp),
                             "copy_ms": sum(ms for ms, cp in inside if cp)})
    fam = defaultdict(float)
    for n, ms in kern.items():
        fam[family(n)] += ms
    return {"busy_ms": sum(ms for n, ms in kern.items() if not n.startswith(("Memcpy", "Memset"))),
            "copy_ms": sum(ms for n, ms in kern.items() if n.startswith(("Memcpy", "Memset"))),
            "per_step": per_step, "markers_found": len(marks),
            "families": dict(sorted(fam.items(), key=lambda x: -x[1])),
            "kernels": [{"name": n, "calls": count[n], "ms": ms} for n, ms in sorted(kern.items(), key=lambda x: -x[1])],
            "runtime": [{"name": n, "calls": rcount[n], "ms": ms}
                        for n, ms in sorted(runtime.items(), key=lambda x: -x[1])]}


# -- report ------------------------------------------------------------------------------------------
def report_block(lines, kind, res, top):
    lines.append(f"\n## {kind} block: {res['tokens']:,} tokens, {res['flops_per_step'] / 1e12:.3g} TFLOP per step "
                 f"({res['seconds']:.0f} s for this block's runs)")
    lines.append("\n| mode | steps | mean step (s, after the first) | TFLOP/s | H200 peak share | peak GPU (GB) | "
                 "projected 300-step training (s) |")
    lines.append("|---|---|---|---|---|---|---|")
    for m in res["modes"].values():
        rate = res["flops_per_step"] / m["mean_step_s"]
        lines.append(f"| {m['mode']} | {m['steps']} | {m['mean_step_s']:.3f} | {rate / 1e12:.3g} | "
                     f"{rate / H200_BF16_PEAK:.1%} | {m['peak_gpu_gb']:.2f} | {300 * m['mean_step_s']:.0f} |")
    prof = res.get("profile")
    lines.append("\nfinal losses (same data, order and starting point in every mode: they should agree; bit for "
                 "bit on the CPU): " + "; ".join(f"{m['mode']} " + ", ".join(f"{k[6:]} {v:.6g}" for k, v in
                                                                           m["final_losses"].items())
                                                 for m in res["modes"].values()))
    for m in res["modes"].values():
        lines.append(f"\n{m['mode']}: per step wall (GPU: CUDA events at the step starts) / host time (s): "
                     + ", ".join(f"{w:.3f}/{h:.3f}" for w, h in zip(m["step_s"], m["host_s"])))
    if not prof:
        return
    p = prof["profile"]
    lines.append(f"\n### profiled ({prof['mode']}, {prof['steps']} steps, wall {prof['wall_s']:.2f} s under the "
                 f"profiler): GPU kernels {p['busy_ms']:.0f} ms, host<->device copies {p['copy_ms']:.0f} ms")
    if p["per_step"]:
        lines.append("\n| step | GPU span (ms) | kernels busy (ms) | idle (ms) | copies (ms, side stream) |")
        lines.append("|---|---|---|---|---|")
        for i, s in enumerate(p["per_step"]):
            lines.append(f"| {i} | {s['span_ms']:.1f} | {s['busy_ms']:.1f} | {s['span_ms'] - s['busy_ms']:.1f} | "
                         f"{s['copy_ms']:.1f} |")
    else:
        lines.append(f"(per-step split unavailable: {p['markers_found']} step markers for {prof['steps']} steps; "
                     f"mean kernels per step {p['busy_ms'] / max(prof['steps'], 1):.1f} ms)")
    total = max(p["busy_ms"] + p["copy_ms"], 1e-9)
    lines.append("\n| family | ms | share |")
    lines.append("|---|---|---|")
    for f, ms in p["families"].items():
        lines.append(f"| {f} | {ms:.0f} | {ms / total:.1%} |")
    lines.append("\n| top kernel | calls | ms | ms/call |")
    lines.append("|---|---|---|---|")
    for k in p["kernels"][:top]:
        lines.append(f"| `{k['name'][:110]}` | {k['calls']} | {k['ms']:.1f} | {k['ms'] / k['calls']:.3f} |")
    if p["runtime"]:
        lines.append("\n| host CUDA runtime call | calls | ms |")
        lines.append("|---|---|---|")
        for r in p["runtime"][:12]:
            lines.append(f"| {r['name']} | {r['calls']} | {r['ms']:.1f} |")
    if "syncs" in res:
        lines.append(f"\nhost syncs reported by torch in one epoch ({res['sync_steps']} steps, after): "
                     + ("none" if not res["syncs"] else ""))
        for where, n in res["syncs"].items():
            lines.append(f"- {n} x {where}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hunyuan-video-13b")
    ap.add_argument("--latent", default="848x480x73", help="pixels WxHxFRAMES: the video token grid")
    ap.add_argument("--tokens", type=int, default=None,
                    help="total tokens (text included) instead of --latent's grid (video laid out as 1 x 1 x n)")
    ap.add_argument("--txt-len", type=int, default=256, help="text tokens (at most a quarter of --tokens)")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per mode (rounded to whole epochs)")
    ap.add_argument("--warmup", type=int, default=1, help="epochs run first and not timed, per block")
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--profile-mode", default="after", help="the mode run under torch.profiler ('' for none)")
    ap.add_argument("--disk", default="capture", choices=("none", "capture", "all"),
                    help="which stores are files (as streaming.py spills): the capture (default), all, none")
    ap.add_argument("--blocks", default="double,single")
    ap.add_argument("--cap-gb", type=float, default=24)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/dev_profile_calib.json")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb * 2**30 / total), dev)
    config = get_preset(a.preset)
    if a.tokens is not None:
        txt_len = min(a.txt_len, a.tokens // 4)
        grid = (1, 1, a.tokens - txt_len)
    else:
        txt_len = a.txt_len
        lat = parse_latent(a.latent, config)
        p = config.patch_size
        grid = (lat[1] // p[0], lat[2] // p[1], lat[3] // p[2])
    tokens = txt_len + grid[0] * grid[1] * grid[2]
    dtype = torch.bfloat16 if cuda else torch.float32   # CPU bf16 matmuls are slow; the CPU run is a smoke test
    epochs = max(1, a.steps // a.samples)
    settings = CalibSettings(method="msad", epochs=epochs)
    warm = CalibSettings(method="msad", epochs=1)
    source = RandomSource(config, seed=0, dtype=dtype)
    policy = default_policy(source.skeleton, settings.w_bits, settings.a_bits)
    folder = Path(tempfile.mkdtemp(prefix="qs-prof-", dir=a.workdir))
    cap = make_capture(source, grid, txt_len, a.samples, dtype, dev, a.disk, folder)
    p = block_params(config)
    res = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
           "preset": a.preset, "tokens": tokens, "txt_len": txt_len, "grid": list(grid), "samples": a.samples,
           "steps_per_mode": epochs * a.samples, "disk": a.disk, "cap_gb": a.cap_gb if cuda else None,
           "amp_bf16": cuda, "blocks": {}}
    lines = [f"# calibration step profile: {res['device']}, torch {torch.__version__}, {a.preset}, {tokens:,} tokens "
             f"({txt_len} text), {a.samples} samples, stores on disk: {a.disk}, MSAD, "
             f"{'bf16 autocast' if cuda else 'float32 (CPU smoke run)'}"]
    modes = [m for m in a.modes.split(",") if m]
    for kind in [k for k in a.blocks.split(",") if k]:
        t_block = time.perf_counter()
        data, msad, opened = make_block_data(cap, config, kind, settings, dtype, dev, a.disk, folder)
        fp = source.block(kind, 0, dev)
        q0 = quantized_copy(fp, policy, f"{kind}_blocks.0", settings)
        flops = 3 * (2 * tokens * (p[kind] - p[kind + "_mod"]) + 4 * tokens ** 2 * config.hidden_size)
        out = {"tokens": tokens, "flops_per_step": flops, "modes": {}}
        if a.warmup:   # kernels compiled / tuned, buffers made
            run_steps(data, fp, q0, CalibSettings(method="msad", epochs=a.warmup), msad, cuda, "after")
        for mode in modes:
            out["modes"][mode] = run_steps(data, fp, q0, settings, msad, cuda, mode)
        if a.profile_mode:
            out["profile"] = run_steps(data, fp, q0, warm, msad, cuda, a.profile_mode, profile=True)
        if cuda:
            dbg = run_steps(data, fp, q0, warm, msad, cuda, "after", sync_debug=True)
            out["syncs"], out["sync_steps"] = dbg["syncs"], dbg["steps"]
        out["seconds"] = time.perf_counter() - t_block
        res["blocks"][kind] = out
        report_block(lines, kind, out, a.top)
        del data, fp, q0, msad
        for s in opened:
            s.close(delete=True)
        if cuda:
            torch.cuda.empty_cache()
    stream_train.PREFETCH = True
    cap.store.close(delete=True)
    try:
        folder.rmdir()
    except OSError:
        pass
    res["seconds"] = time.perf_counter() - t_start
    lines.append(f"\ntotal {res['seconds']:.0f} s")
    print("\n".join(lines))
    if a.out:
        out_path = Path(a.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out_path)
        print(f"wrote {out_path}")
    return res


if __name__ == "__main__":
    main()

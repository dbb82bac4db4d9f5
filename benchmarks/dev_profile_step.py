#!/usr/bin/env python
"""Where a W4A8 + sparse 15% + SSAR step's time goes at full size: one GPU call.

    python benchmarks/dev_profile_step.py [--resolution 720p] [--out FILE] [--top 30]

Builds the HunyuanVideo-13B architecture with random weights (as gpu_benchmark.py), converts it to
W4A8 with the fused small ops, runs the SSAR schedule's first refresh, then profiles (torch.profiler,
CUDA activity) a first-order reuse step, a second-order refresh and a second-order reuse step. Prints, per profiled step, the wall time,
the GPU busy time (sum of kernel times; the difference is where the GPU waited for the host), the time
by kernel family and the top kernels. A development tool: the timings that count are gpu_benchmark.py's.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_benchmark as gb  # noqa: E402  (sets sys.path and the allocator before torch starts)

import torch  # noqa: E402

# Kernel families by name (first match wins).
FAMILIES = [
    ("sparse attention (Triton)", r"_sparse_attn_fwd"),
    ("k/v gather for temporal heads", r"_gather_rows"),
    ("dense attention (cuDNN/flash)", r"cudnn|fmha|flash|sm90_.*attn|attention"),
    ("W4A8 GEMM (Triton)", r"_int_gemm|gemm_tma|_w4|int_gemm"),
    ("act quant (Triton)", r"_act_quant"),
    ("GELU producer (Triton)", r"_gelu_quant"),
    ("norm/modulate producer (Triton)", r"_norm_modulate"),
    ("q/k RMSNorm + RoPE (Triton)", r"_qk_norm_rope"),
    ("SVG head classification", r"_svg_partials"),
    ("bf16/fp32 GEMM (cuBLAS)", r"gemm|sm90_xmma|cutlass|nvjet"),
    ("compiled small ops (inductor)", r"^triton_"),
    ("eigh / cuSOLVER", r"syevd|eigh|cusolver|ormtr|sytrd|stedc"),
    ("copies / casts", r"copy|Memcpy|memcpy|cat|CatArray|to_copy|contiguous"),
    ("reductions", r"reduce|Reduce|norm|sum|max"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise"),
]


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if re.search(pat, name):
            return fam
    return "other"


def profile_step(model, inp, idx):
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        with torch.no_grad(), gb.cudnn_context():
            out = gb.run_model(model, inp, idx)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    del out
    kern = defaultdict(float)
    count = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kern[ev.name] += ev.device_time_total / 1e3 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e3
            count[ev.name] += 1
    return wall, kern, count


def report(lines, title, wall, kern, count, top):
    busy = sum(kern.values()) / 1e3
    lines.append(f"\n## {title}: wall {wall:.2f} s (under the profiler), GPU kernels {busy:.2f} s "
                 f"(idle or overlapped {wall - busy:+.2f} s)\n")
    fam = defaultdict(float)
    for n, ms in kern.items():
        fam[family(n)] += ms
    lines.append("| family | ms | share |")
    lines.append("|---|---|---|")
    for f, ms in sorted(fam.items(), key=lambda x: -x[1]):
        lines.append(f"| {f} | {ms:.0f} | {ms / max(busy * 1e3, 1e-9):.1%} |")
    lines.append("\n| top kernel | calls | ms | ms/call |")
    lines.append("|---|---|---|---|")
    for n, ms in sorted(kern.items(), key=lambda x: -x[1])[:top]:
        lines.append(f"| `{n[:110]}` | {count[n]} | {ms:.1f} | {ms / count[n]:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", default="720p", choices=sorted(gb.RESOLUTIONS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dev_profile_step needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    t_start = time.perf_counter()
    inp = gb.make_inputs(gb.RESOLUTIONS[a.resolution])
    model = gb.build_bf16()
    model.fuse_small_ops()
    gb.to_w4a8(model)
    gb.warm(model, inp)
    dense_s, _ = gb.timed_step(model, inp)
    settings = gb.SparseSettings(density=0.15, placement="gpu-bf16")
    ssar = gb.SSARAttention(settings)
    kinds, _ = gb.schedule(settings)
    first, reuse, second = kinds.index("refresh1"), kinds.index("reuse"), kinds.index("refresh2")
    lines = [f"# step profile: {torch.cuda.get_device_name()}, torch {torch.__version__}, {a.resolution} "
             f"({inp.tokens:,} tokens), W4A8 + sparse 15% + SSAR (gpu-bf16 cache), fused small ops",
             f"unprofiled W4A8 dense step: {dense_s:.2f} s"]
    with model.attention(ssar):
        gb.warm(model, inp, [first, reuse, second, second + 1])   # every kernel variant, low-rank epilogue included
        ssar.reset()
        gb.free_cuda()
        for idx in (first, reuse):
            s, _ = gb.timed_step(model, inp, idx)
            lines.append(f"unprofiled {kinds[idx]} (step {idx}): {s:.2f} s")
        wall, kern, count = profile_step(model, inp, reuse + 1)
        report(lines, f"reuse step {reuse + 1} (first-order correction)", wall, kern, count, a.top)
        wall, kern, count = profile_step(model, inp, second)
        report(lines, f"second-order refresh, step {second}", wall, kern, count, a.top)
        s, _ = gb.timed_step(model, inp, second + 1)
        lines.append(f"\nunprofiled first reuse after it (step {second + 1}): {s:.2f} s")
        wall, kern, count = profile_step(model, inp, second + 2)
        report(lines, f"reuse step {second + 2} (second-order correction)", wall, kern, count, a.top)
        s, _ = gb.timed_step(model, inp, second + 3)
        lines.append(f"\nunprofiled reuse (step {second + 3}): {s:.2f} s")
    lines.append(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    gb.emit(lines, a.out)


if __name__ == "__main__":
    main()

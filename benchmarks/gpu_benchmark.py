#!/usr/bin/env python
"""The one GPU benchmark of QuantSparse: HunyuanVideo-13B architecture, random weights, 129 frames.

    python benchmarks/gpu_benchmark.py [--resolutions 720p,544p] [--out FILE] [--budget-s 540]

Checks correctness first (kernels against their references on small slices, density 1.0 against
dense, quantized and fused steps finite and close), then times, in one run so every ratio compares
numbers measured together:
  - kernels alone at 720p sizes: block-sparse attention vs d x dense cuDNN, W4A8/W8A8 GEMMs and
    linears vs bf16 matmul and fp8 _scaled_mm at the six linear shapes, activation quantization vs
    its bandwidth floor (a measured device copy);
  - one denoising step (all 60 blocks) per configuration: (a) dense bf16 as ComfyUI calls attention
    (SDPA with the additive text mask: not cuDNN), (b) dense bf16 unmasked cuDNN SDPA, eager and
    with fused small ops, (c) W4A8, (d) sparse 15% / 25% + SSAR, (e) W4A8 + sparse 15% + SSAR; the
    sparse configurations time their first refresh, a reuse step and a second-order refresh, and
    the 50-step cost is computed from those times over the exact schedule SparseSettings implies.
Configurations that do not fit the time budget are reported as skipped, never estimated.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Fewer fragmentation failures when the SSAR cache fills most of the GPU (set before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from quantsparse_core.models import HunyuanVideoDiT, StepInfo, get_preset  # noqa: E402
from quantsparse_core.models.config import DiTConfig  # noqa: E402
from quantsparse_core.quant.linear import QuantLinear  # noqa: E402
from quantsparse_core.dispatch import block_sparse_attention, pack_int4  # noqa: E402
from quantsparse_core.quant.policy import default_policy, storage_bytes  # noqa: E402
from quantsparse_core.quant.quantizers import absmax_scale, quantize  # noqa: E402
from quantsparse_core.sparse.masks import BlockMask, band_keep  # noqa: E402
from quantsparse_core.sparse.cache import choose_placement  # noqa: E402
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention  # noqa: E402

RESOLUTIONS = {"720p": (33, 45, 80), "544p": (33, 34, 60)}  # video token grid after 1x2x2 patchify
TXT_LEN, TXT_REAL = 256, 200          # text tokens; real (unpadded) ones for ComfyUI's mask in (a)
STEPS = 50
HIDDEN, HEADS, HEAD_DIM = 3072, 24, 128
# (K, N) of HunyuanVideo-13B's linears: qkv, attention proj, MLP fc1, MLP fc2, single linear1, linear2.
GEMM_SHAPES = [(3072, 9216, "qkv"), (3072, 3072, "proj"), (3072, 12288, "mlp fc1"), (12288, 3072, "mlp fc2"),
               (3072, 21504, "single linear1"), (15360, 3072, "single linear2")]
DENSITIES = (0.10, 0.15, 0.25, 0.40)
SPARSE_STEPS = 5.3  # a sparse configuration's five timed steps + warm-up, in dense-step units (~3.7 in run 13; kept high)
GB = 1e9


# ---- small utilities ---------------------------------------------------------------------------
def log(*a):
    print(*a, flush=True)


def free_cuda():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def emit(lines, out=None) -> None:
    """Print a development script's report and write it to `out` (if given)."""
    text = "\n".join(lines)
    print("\n" + text)
    if out:
        Path(out).write_text(text + "\n")


def kernel_ms(fn, reps=5, warmup=1, batch=1) -> float:
    """Median CUDA-event time of fn() in milliseconds. batch > 1: fn() runs `batch` times back to back
    between the events (the time is per call), so each launch's host work overlaps the previous call's
    GPU work as in the model's queue; with batch 1 a sub-millisecond kernel also pays the idle GPU's
    wait for its own launch (act_quant at K = 3072: 0.334 ms timed singly in run 14, 0.285 ms back to
    back in run 17)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(batch):
            fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / batch)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(reps=5) -> float:
    """Measured device copy bandwidth in bytes/s (1 GiB read + 1 GiB write), copies back to back."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (kernel_ms(lambda: dst.copy_(src), reps=reps, batch=4) / 1e3)


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def try_import(name):
    try:
        return importlib.import_module(name), None
    except Exception as e:  # a kernel module that is missing or broken is reported, not faked
        return None, f"{type(e).__name__}: {e}"


def cudnn_context():
    """Prefer cuDNN SDPA (the fastest dense attention on H100) for unmasked attention; fall back to
    the other fused backends only where cuDNN refuses an input (check_cudnn_layouts reports it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # older torch: no priority order, cuDNN only
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def check_cudnn_layouts(rep):
    """Whether cuDNN alone accepts the q/k/v layouts the blocks pass (strided views of the qkv output)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qkv = torch.randn(1, 1280, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v)
        rep.note("cuDNN SDPA accepts the blocks' strided v layout")
    except Exception as e:
        rep.note(f"cuDNN SDPA refuses the blocks' strided v layout ({type(e).__name__}); those calls fall back")


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self):
        return time.perf_counter() - self.t0

    def allows(self, need_s) -> bool:
        return self.elapsed() + need_s <= self.seconds


class Report:
    """Everything measured, printed as it comes and written as markdown + JSON."""

    def __init__(self, out):
        self.out = out
        self.data = {"env": {}, "checks": [], "attention": [], "gemm": [], "act_quant": [], "steps": {},
                     "amortized": {}, "notes": []}

    def note(self, msg):
        log("NOTE:", msg)
        self.data["notes"].append(msg)

    def check(self, name, value, tol, ok=None, info=""):
        ok = (value <= tol) if ok is None else ok
        row = dict(check=name, value=value, tolerance=tol, ok=bool(ok), info=info)
        log(f"CHECK {'PASS' if ok else 'FAIL'}: {name}: {value:.3g} (tolerance {tol:g}) {info}")
        self.data["checks"].append(row)

    def save(self):
        if not self.out:
            return
        Path(self.out).write_text(self.markdown())
        Path(str(self.out) + ".json").write_text(json.dumps(self.data, indent=1, default=str))

    def targets(self):
        return _targets(self.data)

    def markdown(self) -> str:
        d, L = self.data, []
        e = d["env"]
        L += [f"Measured by `python benchmarks/gpu_benchmark.py {e.get('argv', '')}` on {e.get('gpu')}, "
              f"torch {e.get('torch')}, Triton {e.get('triton')}, CUDA {e.get('cuda')}, "
              f"PYTORCH_CUDA_ALLOC_CONF={e.get('alloc')}, {e.get('date')}.", ""]
        L += ["### Correctness checks (before timing)", "", "| check | value | tolerance | result |", "|---|---|---|---|"]
        L += [f"| {c['check']} | {c['value']:.3g} | {c['tolerance']:g} | {'pass' if c['ok'] else 'FAIL'} {c['info']} |"
              for c in d["checks"]]
        if d["attention"]:
            L += ["", "### Block-sparse attention, one layer (N = 119,056, 24 heads x 128, bf16)", "",
                  "| kernel | requested d | realized d | ms | d x dense cuDNN ms | ratio (target <= 1.15) |",
                  "|---|---|---|---|---|---|"]
            for r in d["attention"]:
                L.append(f"| {r['name']} | {r.get('density', '')} | {_f(r.get('realized'), 4)} | {_f(r.get('ms'), 1)} | "
                         f"{_f(r.get('d_dense_ms'), 1)} | {_f(r.get('ratio'), 3)} |")
        if d["gemm"]:
            L += ["", "### Linears at M = 119,056 tokens (ms; speed-up vs bf16 F.linear in brackets)", "",
                  "| layer (K, N) | bf16 | fp8 _scaled_mm | W8A8 GEMM | W4A8 GEMM | W8A8 linear | W4A8 linear | "
                  "W4A8 linear, input quantized by its producer |",
                  "|---|---|---|---|---|---|---|---|"]
            for r in d["gemm"]:
                base = r.get("bf16")
                cells = []
                for k in ("bf16", "fp8", "w8a8_gemm", "w4a8_gemm", "w8a8_linear", "w4a8_linear", "w4a8_fused"):
                    v = r.get(k)
                    if isinstance(v, (int, float)):
                        cells.append(f"{v:.2f} ({base / v:.2f}x)" if base and k != "bf16" else
                                     f"{v:.2f} ({2 * 119056 * r['K'] * r['N'] / v / 1e9:.0f} TFLOP/s)")
                    else:
                        cells.append(str(v))
                L.append(f"| {r['name']} ({r['K']}, {r['N']}) | " + " | ".join(cells) + " |")
            L += ["", "GEMM = the kernel on already-quantized int8 activations; linear = QuantLinear.forward "
                  "(activation quantization + GEMM + epilogue) on a bf16 input. fp8 = the GEMM alone. Input "
                  "quantized by its producer = what the fused model runs (fuse_small_ops): W4A8 GEMM + (the "
                  "kernels.producer_quant kernel emitting int8 codes - the compiled group emitting bf16); producers: "
                  "modulated LayerNorm (qkv, linear1), gated residual + modulated LayerNorm (fc1), GELU (fc2; "
                  "its bf16 baseline is the eager GELU the block runs), GELU + concat (linear2); proj's input "
                  "is the attention output, quantized by act_quant."]
            prod = [r for r in d["gemm"] if isinstance(r.get("producer_bf16_ms"), float)]
            if prod:
                L += ["", "| layer | producer | compiled group, bf16 out ms | producer_quant kernel, int8 codes out ms |", "|---|---|---|---|"]
                L += [f"| {r['name']} | {r['producer']} | {r['producer_bf16_ms']:.3f} | {_f(r.get('producer_q_ms'), 3)} |"
                      for r in prod]
        if d["act_quant"]:
            L += ["", "### Activation quantization (M = 119,056 tokens, bf16 in, int8 + fp32 scale out)", "",
                  "| K | Triton ms | bandwidth floor ms | ratio (target <= 1.2) | eager torch ms |", "|---|---|---|---|---|"]
            for r in d["act_quant"]:
                L.append(f"| {r['K']} | {_f(r.get('ms'), 3)} | {_f(r.get('floor_ms'), 3)} | {_f(r.get('ratio'), 2)} | "
                         f"{_f(r.get('eager_ms'), 2)} |")
        for res, rows in d["steps"].items():
            L += ["", f"### One denoising step at {res} ({rows[0].get('tokens', '')} tokens), all 60 blocks", "",
                  "| configuration | step | seconds | peak GPU GB | notes |", "|---|---|---|---|---|"]
            for r in rows:
                L.append(f"| {r['config']} | {r['step']} | {_f(r.get('s'), 2)} | {_f(r.get('peak_gb'), 1)} | "
                         f"{r.get('notes', '')} |")
        for res, rows in d["amortized"].items():
            L += ["", f"### 50-step cost at {res} (computed from the measured step times above)", "",
                  "| configuration | schedule (dense / refresh-1 / refresh-2 / reuse: after refresh-1 + first after refresh-2 + other) | s per step | 50 steps s | "
                  "vs (a) | vs (b) eager | vs (b) fused | time share | vs (a) if reuse steps were free |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                ceil = r.get("ceiling_vs_a")
                L.append(f"| {r['config']} | {r['schedule']} | {_f(r['per_step'], 2)} | {_f(r['total'], 0)} | "
                         f"{_f(r.get('vs_a'), 2)}x | {_f(r.get('vs_b'), 2)}x | {_f(r.get('vs_b_fused'), 2)}x | "
                         f"{r.get('shares', '')} | {'' if ceil is None else f'{ceil:.2f}x'} |")
        for res, rows in d["amortized"].items():
            for r in rows:
                if r.get("whatif"):
                    L += ["", f"### {r['config']} at {res} under other schedules (computed from its measured steps)",
                          "", "| refresh interval tau | dense warm-up steps | s per step | vs (a) | vs (b) eager |",
                          "|---|---|---|---|---|"]
                    L += [f"| {w['tau']} | {w['warmup']} | {_f(w['per_step'], 2)} | {_f(w.get('vs_a'), 2)}x | "
                          f"{_f(w.get('vs_b'), 2)}x |" for w in r["whatif"]]
        L += ["", "### Issue targets (from the numbers above)", "", "| target | measured | met |", "|---|---|---|"]
        L += [f"| {t} | {m} | {ok} |" for t, m, ok in self.targets()]
        if d["notes"]:
            L += ["", "### Notes", ""] + [f"- {n}" for n in d["notes"]]
        return "\n".join(L) + "\n"


def _targets(d):
    out = []
    amort = {r["config"]: r for r in d["amortized"].get("720p", [])}
    e = next((r for name, r in amort.items() if name.startswith("(e)")), None)
    for key, goal, label in (("vs_a", 3.0, "(a) ComfyUI-style"), ("vs_b", 2.2, "(b) cuDNN eager")):
        v = e.get(key) if e else None
        out.append((f"720p W4A8 + 15% + SSAR, 50-step amortized, >= {goal}x vs {label}",
                    "not measured" if v is None else f"{v:.3f}x", "-" if v is None else ("yes" if v >= goal else
                                                                                          f"no ({v / goal:.1%} of it)")))
    for dens in (0.15, 0.25):
        r = next((r for r in d["attention"] if r.get("density") == dens and r["name"] == "block-sparse Triton kernel"
                  and isinstance(r.get("ratio"), float)), None)
        out.append((f"sparse attention {dens:.0%} <= 1.15 x d x dense cuDNN", "not measured" if r is None else
                    f"{r['ratio']:.3f}", "-" if r is None else ("yes" if r["ratio"] <= 1.15 else "no")))
    for key, label in (("w4a8_linear", "W4A8 linear (act quant + GEMM, bf16 input)"),
                       ("w4a8_fused", "W4A8 linear as the fused model runs it (input quantized by its producer; "
                                      "proj: act quant + GEMM)"),
                       ("w4a8_gemm", "W4A8 GEMM alone")):
        sp = [(r["name"], r["bf16"] / r[key]) for r in d["gemm"] if isinstance(r.get(key), float)]
        if sp:
            worst = min(sp, key=lambda t: t[1])
            out.append((f"{label} >= 1.4x bf16 at all six shapes",
                        f"{min(v for _, v in sp):.3f}x-{max(v for _, v in sp):.2f}x (lowest: {worst[0]})",
                        "yes" if worst[1] >= 1.4 and len(sp) == 6 else "no"))
    aq = [r["ratio"] for r in d["act_quant"] if isinstance(r.get("ratio"), float)]
    if aq:
        out.append(("activation quantization <= 1.2x bandwidth floor", f"{min(aq):.2f}x-{max(aq):.3f}x",
                    "yes" if max(aq) <= 1.2 else "no"))
    return out


def _f(v, digits):
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else ("" if v is None else str(v))


# ---- environment -------------------------------------------------------------------------------
def environment(rep, argv):
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not importable"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        smi = torch.cuda.get_device_name()
    rep.data["env"] = dict(gpu=smi, torch=torch.__version__, triton=tv, cuda=torch.version.cuda,
                           python=platform.python_version(), argv=" ".join(argv),
                           alloc=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                           date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    log("ENV", rep.data["env"])


# ---- correctness checks ------------------------------------------------------------------------
def check_kernels(rep, mods):
    aq, ig, sa = mods["act_quant"], mods["int_gemm"], mods["sparse_attention"]
    g = torch.Generator(device="cuda").manual_seed(1)
    if aq:
        from quantsparse_kernels.act_quant_ref import act_quant_ref
        x = torch.randn(2048, 3072, device="cuda", generator=g, dtype=torch.bfloat16) * 3
        c, s = aq.act_quant(x, 8)
        cr, sr = act_quant_ref(x, 8)
        rep.check("act_quant codes differing from the reference (fraction)", float((c != cr).float().mean()), 1e-4)
        rep.check("act_quant scale rel. error", rel_err(s, sr), 1e-6)
    if ig and aq:
        from quantsparse_kernels.int_gemm_ref import int_gemm_ref
        x = torch.randn(1000, 3072, device="cuda", generator=g, dtype=torch.bfloat16)
        w = torch.randn(1536, 3072, device="cuda", generator=g) * 0.02
        bias = torch.randn(1536, device="cuda", generator=g)
        codes, sx = aq.act_quant(x, 8)
        for bits in (8, 4):
            sw = absmax_scale(w, bits, dim=1)
            wq = quantize(w, sw, bits)
            stored = pack_int4(wq) if bits == 4 else wq
            got = ig.int_gemm(codes, sx, ig.prepare_weight(stored, bits, sw), bias, out_dtype=torch.float32)
            ref = int_gemm_ref(codes, sx, stored, sw, bits, bias)
            rep.check(f"W{bits}A8 int_gemm vs int64/float64 reference (M=1000, K=3072, N=1536)", rel_err(got, ref), 1e-5)
            lin = QuantLinear.from_packed(3072, 1536, bits, 8, False, None,
                                          {"weight_packed": stored, "weight_scale": sw, "bias": bias,
                                           "act_clip": torch.ones((), device="cuda")}, device="cuda")
            from quantsparse_core import dispatch
            with torch.no_grad():
                fast = lin(x)
                with dispatch.forced("torch"):
                    slow = lin(x)
            rep.check(f"W{bits}A8 QuantLinear Triton path vs PyTorch path", rel_err(fast, slow), 1e-2)
    if sa:
        from quantsparse_core import dispatch
        grid, heads = (6, 12, 20), 4
        n = TXT_LEN + math.prod(grid)
        q, k, v = (torch.randn(1, heads, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        keep = band_keep(n, TXT_LEN, 0.25).expand(heads, -1, -1).clone()
        bm = BlockMask(keep, ["spatial", "temporal"] * (heads // 2), 128, n)
        mask = torch.zeros(1, 1, n, device="cuda", dtype=torch.bfloat16)
        mask[..., TXT_REAL:TXT_LEN] = -torch.finfo(torch.bfloat16).max
        corr = torch.randn(1, n, heads * HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
        got = block_sparse_attention(q, k, v, mask, bm, TXT_LEN, grid, correction=corr)
        with dispatch.forced("torch"):
            ref = dispatch.block_sparse_attention(q, k, v, mask, bm, TXT_LEN, grid, correction=corr)
        rep.check("sparse attention kernel vs reference (25%, spatial+temporal heads, text mask, SSAR correction, "
                  f"N={n})", rel_err(got, ref), 1e-2)
        try:  # ComfyUI samples under inference_mode: masks built there are inference tensors
            with torch.inference_mode():
                bm_inf = BlockMask(band_keep(n, TXT_LEN, 0.25).expand(heads, -1, -1).clone(), bm.kinds, 128, n)
                got_inf = block_sparse_attention(q, k, v, mask, bm_inf, TXT_LEN, grid, correction=corr)
            rep.check("sparse attention under torch.inference_mode equals the no_grad result", rel_err(got_inf, got), 1e-6)
        except Exception as e:
            rep.check("sparse attention under torch.inference_mode runs", 1.0, 0.0,
                      info=f"raised {type(e).__name__}: {str(e)[:120]}")


def check_ssar_density_one(rep):
    """Sparse at density 1.0 (kernel + SSAR reuse path) equals dense on a 2+2-block model of real width."""
    cfg = DiTConfig(depth_double=2, depth_single=2)
    torch.manual_seed(3)
    model = HunyuanVideoDiT(cfg, device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    inp = make_inputs((4, 16, 16))
    with torch.no_grad(), cudnn_context():
        dense = run_model(model, inp, None)
        ssar = SSARAttention(SparseSettings(density=1.0, warmup_steps=0, warmup_blocks=0, placement="gpu-bf16"))
        with model.attention(ssar):
            run_model(model, inp, 0)            # refresh: exact attention, cache D = full - sparse
            reuse = run_model(model, inp, 1)    # reuse: sparse(all blocks) + C
    rep.check("SSAR reuse step at density 1.0 vs dense (2+2 blocks, hidden 3072, 1,280 tokens)",
              rel_err(reuse, dense), 2e-2, info=f"reuse calls: {int(ssar.stats['sparse'])}")
    del model
    free_cuda()


def ssar_layer_ms(q, k, v, grid, steps=(0, 1, 5, 6, 7, 10)):
    """Wall ms of one joint block's SSARAttention calls (refresh-1, reuse, refresh-2) at 15%, after a
    warm-up run of the same steps (kernel compiles); compare with dense + sparse attention alone."""
    from quantsparse_core.models.attention import AttentionCall, StepInfo
    sig = torch.linspace(1, 0, STEPS + 1)
    names = {0: "refresh-1", 1: "reuse", 5: "refresh-2", 10: "refresh-2",
             6: "reuse, waiting for step 5's host eigh (one layer: no other work to hide it behind)",
             7: "reuse with the second-order correction (int8 D + rank-16 factors in the epilogue)"}
    out = {}
    for rep_i in range(2):
        ssar = SSARAttention(SparseSettings(density=0.15, warmup_steps=0, warmup_blocks=0, placement="gpu-int8"))
        for step in steps:
            call = AttentionCall("double", 3, 20, TXT_LEN, grid, StepInfo(step, sig))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with cudnn_context():
                ssar(q, k, v, None, call)
            torch.cuda.synchronize()
            if rep_i == 1:
                out[f"{names[step]} (step {step})"] = (time.perf_counter() - t0) * 1e3
        del ssar
    return out


def bench_refresh_attention(rep, sa, q, k, v, bm, grid, dense_ms):
    """A refresh's O_full and D = O_full - O_sparse: dense cuDNN + a sparse pass (as without the
    kernel) against the kernel over the mask and its complement merged by log-sum-exp."""
    from quantsparse_core.dispatch import refresh_attention
    n = q.shape[2]

    def unmerged():
        with cudnn_context():
            full = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, n, -1)
        sparse = block_sparse_attention(q, k, v, None, bm, TXT_LEN, grid)
        return full, full.float() - sparse.float()

    full_u, d_u = unmerged()
    full_m, d_m = refresh_attention(q, k, v, None, bm, TXT_LEN, grid)
    rep.check("merged refresh attention O_full vs dense cuDNN (15%, N=119,056)", rel_err(full_m, full_u), 1e-2)
    rep.check("merged refresh attention D vs dense cuDNN - sparse kernel (15%, N=119,056)", rel_err(d_m, d_u), 2e-2)
    del full_u, d_u, full_m, d_m
    for name, fn in (("SSAR refresh attention: dense cuDNN + sparse pass, D in fp32", unmerged),
                     ("SSAR refresh attention: kernel over mask + complement, merged by log-sum-exp",
                      lambda: refresh_attention(q, k, v, None, bm, TXT_LEN, grid))):
        ms = kernel_ms(fn, reps=3)
        rep.data["attention"].append(dict(name=f"{name} ({ms / dense_ms:.3f} x dense cuDNN)", density=0.15, ms=ms))
        log(f"attention: {name} {ms:.1f} ms = {ms / dense_ms:.3f} x dense")
        free_cuda()


# ---- kernels alone -----------------------------------------------------------------------------
def bench_attention(rep, sa):
    grid = RESOLUTIONS["720p"]
    n = TXT_LEN + math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    with cudnn_context():
        dense_out = F.scaled_dot_product_attention(q, k, v)
        dense_ms = kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps=3)
    mask = torch.zeros(1, 1, 1, n, device="cuda", dtype=torch.bfloat16)
    mask[..., TXT_REAL:TXT_LEN] = -torch.finfo(torch.bfloat16).max
    masked_ms = kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), reps=3)
    rep.data["attention"].append(dict(name="dense cuDNN SDPA (unmasked)", ms=dense_ms))
    rep.data["attention"].append(dict(name="dense SDPA with ComfyUI's [1,1,L] text mask (default backend)", ms=masked_ms))
    log(f"attention: dense cuDNN {dense_ms:.1f} ms, masked default SDPA {masked_ms:.1f} ms")
    if sa is None:
        rep.data["attention"].append(dict(name="block-sparse Triton kernel", ms="not available"))
        return dense_ms
    kinds = ["spatial", "temporal"] * (HEADS // 2)
    full = BlockMask(torch.ones(HEADS, -(-n // 128), -(-n // 128), dtype=torch.bool), kinds, 128, n)
    out1 = block_sparse_attention(q, k, v, None, full, TXT_LEN, grid)
    rep.check("sparse kernel at density 1.0 (half the heads permuted) vs dense cuDNN, N=119,056",
              rel_err(out1, dense_out.transpose(1, 2).reshape(1, n, -1)), 1e-2)
    del out1, dense_out
    for d in DENSITIES:
        keep = band_keep(n, TXT_LEN, d).expand(HEADS, -1, -1).clone()
        bm = BlockMask(keep, kinds, 128, n)
        real = bm.density()
        ms = kernel_ms(lambda: block_sparse_attention(q, k, v, None, bm, TXT_LEN, grid), reps=3)
        row = dict(name="block-sparse Triton kernel", density=d, realized=real, ms=ms, d_dense_ms=real * dense_ms,
                   ratio=ms / (real * dense_ms))
        rep.data["attention"].append(row)
        log(f"attention: sparse {d:.0%} (realized {real:.4f}) {ms:.1f} ms = {row['ratio']:.3f} x d x dense")
        if d == 0.15:
            corr = torch.randn(1, n, HIDDEN, device="cuda", generator=g, dtype=torch.bfloat16)
            ms_c = kernel_ms(lambda: block_sparse_attention(q, k, v, None, bm, TXT_LEN, grid, correction=corr), reps=3)
            rep.data["attention"].append(dict(name="block-sparse + SSAR correction in the epilogue", density=d,
                                              realized=real, ms=ms_c, d_dense_ms=real * dense_ms,
                                              ratio=ms_c / (real * dense_ms)))
            # As SSAR hands it over with the gpu-int8 cache: int8 D x row scale + rank-16 factors.
            from quantsparse_core.dispatch import Correction
            scale = corr.float().abs().amax(-1, keepdim=True) / 127
            parts = Correction(codes=torch.round(corr.float() / scale).to(torch.int8), scale=scale,
                               us=torch.randn(1, HEADS, n, 16, device="cuda", generator=g, dtype=torch.bfloat16),
                               vh=torch.randn(1, HEADS, 16, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16))
            ms_p = kernel_ms(lambda: block_sparse_attention(q, k, v, None, bm, TXT_LEN, grid, correction=parts), reps=3)
            rep.data["attention"].append(dict(name="block-sparse + SSAR correction rebuilt in the epilogue "
                                                   "(int8 D x row scale + rank-16 factors)", density=d,
                                              realized=real, ms=ms_p, d_dense_ms=real * dense_ms,
                                              ratio=ms_p / (real * dense_ms)))
            del corr, parts
            bench_refresh_attention(rep, sa, q, k, v, bm, grid, dense_ms)
    # What a refresh adds per layer besides dense + sparse attention (SSARAttention's own calls).
    from quantsparse_core.sparse.masks import svg_masks
    from quantsparse_core.sparse.low_rank import truncated_factors
    mask_ms = kernel_ms(lambda: svg_masks(q, k, v, None, TXT_LEN, grid, 0.15, 64, 128,
                                          torch.Generator().manual_seed(0)), reps=2)
    rep.data["attention"].append(dict(name="SSAR refresh: svg_masks head classification (64 rows/head)", ms=mask_ms))
    ssar_calls = ssar_layer_ms(q, k, v, grid)
    for kind, ms in ssar_calls.items():
        rep.data["attention"].append(dict(name=f"SSARAttention call, one layer, 15%, gpu-int8 cache: {kind}", ms=ms))
    del q, k, v
    free_cuda()
    d2 = torch.randn(1, n, HIDDEN, device="cuda", generator=g)
    svd_ms = kernel_ms(lambda: truncated_factors(d2, HEADS, 16), reps=2)
    rep.data["attention"].append(dict(name="SSAR refresh: rank-16 truncation of D2 inline (low_rank.truncated_factors, "
                                      "24 heads x [N x 128])", ms=svd_ms))
    log(f"attention: svg_masks {mask_ms:.1f} ms, SVD {svd_ms:.1f} ms per layer, SSAR calls {ssar_calls}")
    del d2
    free_cuda()
    return dense_ms


def bench_linears(rep, aq, ig):
    m = 119056
    g = torch.Generator(device="cuda").manual_seed(4)
    # Bandwidth floor for activation quantization: a measured device copy (read + write).
    bw = copy_bandwidth()
    rep.note(f"measured device copy bandwidth {bw / 1e12:.2f} TB/s (1 GiB read + 1 GiB write); the activation "
             "quantization floor is (2 MK + MK + 4 M bytes) at this bandwidth")
    rep.note("linears and activation quantization are timed with calls back to back between the CUDA events (3 per "
             "timing; act_quant and the copy 10 and 4), baselines the same way, so a launch's host work overlaps the "
             "previous call as in the model's queue (runs 1-15 timed one call per event pair, which also counted the "
             "idle GPU's wait for each Triton launch)")
    for kdim in sorted({k for k, _, _ in GEMM_SHAPES}):
        x = torch.randn(m, kdim, device="cuda", generator=g, dtype=torch.bfloat16)
        floor = (3 * m * kdim + 4 * m) / bw * 1e3
        row = dict(K=kdim, floor_ms=floor)
        if aq:
            row["ms"] = kernel_ms(lambda: aq.act_quant(x, 8), reps=10, batch=10)  # back to back, as the floor
            row["ratio"] = row["ms"] / floor
        else:
            row["ms"] = "not available"
        if kdim == 3072:
            from quantsparse_kernels.act_quant_ref import act_quant_ref
            row["eager_ms"] = kernel_ms(lambda: act_quant_ref(x, 8), reps=3)
        rep.data["act_quant"].append(row)
        log("act_quant", row)
        del x
        free_cuda()
    for kdim, ndim, name in GEMM_SHAPES:
        try:
            _bench_shape(rep, aq, ig, m, kdim, ndim, name, g)
        except Exception as e:
            traceback.print_exc()
            rep.data["gemm"].append(dict(name=name, K=kdim, N=ndim, bf16=f"failed: {type(e).__name__}: {str(e)[:100]}"))
        free_cuda()


def _bench_shape(rep, aq, ig, m, kdim, ndim, name, g):
    x = torch.randn(m, kdim, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(ndim, kdim, device="cuda", generator=g, dtype=torch.bfloat16) * kdim ** -0.5
    bias = torch.randn(ndim, device="cuda", generator=g, dtype=torch.bfloat16) * 0.1
    row = dict(name=name, K=kdim, N=ndim)
    row["bf16"] = kernel_ms(lambda: F.linear(x, w, bias), reps=5, batch=3)
    try:
        f8 = torch.float8_e4m3fn
        xs = (x.abs().amax(1, keepdim=True).float() / 448).clamp_min(1e-12)
        ws = (w.abs().amax(1, keepdim=True).float() / 448).clamp_min(1e-12)
        x8, w8 = (x / xs).to(f8), (w / ws).to(f8)
        row["fp8"] = kernel_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), bias=bias,
                                                        out_dtype=torch.bfloat16), reps=5, batch=3)
        del x8, w8
    except Exception as e:
        row["fp8"] = f"failed: {type(e).__name__}"
    if aq and ig:
        codes, sx = aq.act_quant(x, 8)
        x3 = x.view(1, m, kdim)
        for bits in (8, 4):
            sw = absmax_scale(w.float(), bits, dim=1)
            wq = quantize(w.float(), sw, bits)
            stored = pack_int4(wq) if bits == 4 else wq
            pw = ig.prepare_weight(stored, bits, sw)
            bf = bias.float()
            row[f"w{bits}a8_gemm"] = kernel_ms(lambda: ig.int_gemm(codes, sx, pw, bf, out_dtype=torch.bfloat16), reps=5,
                                               batch=3)
            lin = QuantLinear.from_packed(kdim, ndim, bits, 8, False, None,
                                          {"weight_packed": stored, "weight_scale": sw, "bias": bias,
                                           "act_clip": torch.ones((), device="cuda")}, device="cuda")
            with torch.no_grad():
                row[f"w{bits}a8_linear"] = kernel_ms(lambda: lin(x3), reps=5, batch=3)
            if bits == 4:
                _bench_producer(rep, row, lin, m, kdim, name, g)
            del lin, pw, wq, stored
        del codes, sx
    else:
        for k in ("w8a8_gemm", "w4a8_gemm", "w8a8_linear", "w4a8_linear"):
            row[k] = "not available"
    rep.data["gemm"].append(row)
    log("gemm", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    del x, w, bias


def _bench_producer(rep, row, lin, m, kdim, name, g):
    """The linear as the fused model runs it: its input made by the op before it, either in bf16 by
    the compiled small-op group (then QuantLinear quantizes it in act_quant), or as int8 codes by the
    kernels.producer_quant kernel (what fuse_small_ops runs for a W4A8 model)."""
    from quantsparse_kernels import producer_quant_ref as ref
    from quantsparse_core.models import blocks, fusion, layers
    ops = fusion.small_ops(True)
    spec = lin.input_quant_spec(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if name == "proj" or spec is None:
        row["w4a8_fused"] = row["w4a8_linear"]  # attention output: quantized by act_quant in QuantLinear
        return
    x = torch.randn(1, m, 3072, generator=g, **bf)
    mod = [torch.randn(1, 1, 3072, generator=g, **bf) * 0.1 for _ in range(3)]
    if name in ("qkv", "single linear1"):
        row["producer"] = "norm_modulate"
        plain, quant = (lambda: ops.norm_modulate(x, mod[0], mod[1])), (lambda: fusion.norm_modulate_q(x, mod[0], mod[1], *spec))
        check = lambda: ref.norm_modulate_quant_ref(x, mod[0], mod[1], *spec)[1:]  # noqa: E731
    elif name == "mlp fc1":
        y = torch.randn(1, m, 3072, generator=g, **bf)
        row["producer"] = "gated_residual_norm_modulate"
        plain = lambda: ops.gated_residual_norm_modulate(x, y, mod[2], mod[0], mod[1])  # noqa: E731
        quant = lambda: fusion.gated_residual_norm_modulate_q(x, y, mod[2], mod[0], mod[1], *spec)[1:]  # noqa: E731
        check = lambda: ref.norm_modulate_quant_ref(x, mod[0], mod[1], *spec, residual=y, gate=mod[2])[1:]  # noqa: E731
    elif name == "mlp fc2":
        hid = torch.randn(1, m, kdim, generator=g, **bf)
        row["producer"] = "GELU (bf16: the eager nn.GELU the block runs)"
        act = nn.GELU(approximate="tanh")
        plain, quant = (lambda: act(hid)), (lambda: fusion.gelu_q(hid, *spec))
        check = lambda: ref.gelu_quant_ref(hid, *spec)  # noqa: E731
    else:  # single linear2
        hid = torch.randn(1, m, kdim - 3072, generator=g, **bf)
        row["producer"] = "concat_gelu"
        plain, quant = (lambda: ops.concat_gelu(x, hid)), (lambda: fusion.concat_gelu_q(x, hid, *spec))
        check = lambda: ref.gelu_quant_ref(hid, *spec, prefix=x)  # noqa: E731
    with torch.no_grad():
        (codes, sx), (rc, rs) = quant(), check()
        diff = (codes.int() - rc.int()).abs()
        rep.check(f"{name}: producer_quant ({row['producer']}) vs its PyTorch reference: codes differing (fraction)",
                  float((diff > 0).float().mean()), 1e-3, ok=bool(diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3),
                  info=f"max code difference {int(diff.max())}")
        rep.check(f"{name}: same, scale rel. error", rel_err(sx, rs), 1e-3)
        del codes, sx, rc, rs, diff
        row["producer_bf16_ms"] = kernel_ms(plain, reps=5, batch=3)
        row["producer_q_ms"] = kernel_ms(quant, reps=5, batch=3)
    row["w4a8_fused"] = row["w4a8_gemm"] + row["producer_q_ms"] - row["producer_bf16_ms"]


# ---- the full model ----------------------------------------------------------------------------
class Inputs:
    def __init__(self, grid):
        t, h, w = grid
        g = torch.Generator(device="cuda").manual_seed(5)
        bf = torch.bfloat16
        self.grid = grid
        self.x = torch.randn(1, 16, t, 2 * h, 2 * w, device="cuda", generator=g, dtype=bf)
        self.ctx = torch.randn(1, TXT_LEN, 4096, device="cuda", generator=g, dtype=bf)
        self.y = torch.randn(1, 768, device="cuda", generator=g, dtype=bf)
        self.t = torch.tensor([900.0], device="cuda")
        self.guidance = torch.tensor([6.0], device="cuda")
        self.mask = torch.ones(1, TXT_LEN, dtype=torch.long, device="cuda")
        self.mask[:, TXT_REAL:] = 0   # padded text, as ComfyUI's text encoders leave it
        self.tokens = TXT_LEN + t * h * w


def make_inputs(grid):
    return Inputs(grid)


SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)


def run_model(model, inp, step_index, masked=False):
    step = None if step_index is None else StepInfo(step_index, SIGMAS)
    return model(inp.x, inp.t, inp.ctx, inp.y, inp.guidance, attention_mask=inp.mask if masked else None, step=step)


def timed_step(model, inp, step_index=None, masked=False):
    """One full forward; (seconds, output). (a) runs SDPA's default choice with the mask; the others cuDNN.
    no_grad rather than inference_mode: see the note main() records about inference tensors."""
    ctx = contextlib.nullcontext() if masked else cudnn_context()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), ctx:
        out = run_model(model, inp, step_index, masked)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def truncated(model, n=2):
    """The model with only its first n double and n single blocks: warms up every kernel and shape
    (compiles, autotunes, cuDNN plans) at a fraction of a step's cost."""
    d, s = model.double_blocks, model.single_blocks
    model.double_blocks, model.single_blocks = nn.ModuleList(list(d)[:n]), nn.ModuleList(list(s)[:n])
    try:
        yield model
    finally:
        model.double_blocks, model.single_blocks = d, s


def warm(model, inp, steps=(None,), masked=False):
    """Two blocks of each kind, so later blocks' input layouts are seen too (no recompiles in a timed step)."""
    with truncated(model):
        for idx in steps:
            timed_step(model, inp, idx, masked)


def build_bf16(seed=0):
    torch.manual_seed(seed)
    model = HunyuanVideoDiT(get_preset("hunyuan-video-13b"), device="cuda", dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def to_w4a8(model):
    """Swap every linear default_policy names for a frozen QuantLinear, one layer at a time: the bf16
    weight is quantized per output channel on the GPU (fp32 only for that one layer), packed, and freed.
    Modulation linears become weight-only W4 (default_policy)."""
    policy = default_policy(model)
    for name, rule in policy.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, child)
        w = lin.weight.float()
        sw = absmax_scale(w, rule.w_bits, dim=1)
        codes = quantize(w, sw, rule.w_bits)
        del w
        tensors = {"weight_packed": pack_int4(codes) if rule.w_bits == 4 else codes, "weight_scale": sw}
        if lin.bias is not None:
            tensors["bias"] = lin.bias
        if rule.a_bits < 16:
            tensors["act_clip"] = torch.ones((), device="cuda")
        setattr(parent, child, QuantLinear.from_packed(lin.in_features, lin.out_features, rule.w_bits, rule.a_bits,
                                                       False, None, tensors, device="cuda"))
        del lin, codes, tensors
    free_cuda()
    return policy


WHATIF_TAUS, WHATIF_WARMUPS = (5, 6, 8, 10), (5, 2)


REUSE_KINDS = ("reuse", "reuse2a", "reuse2")


def schedule(settings: SparseSettings, steps=STEPS):
    """Kinds of the `steps` steps SSARAttention runs: dense warm-up, refreshes (the first has only the
    first-order residual; later ones add the second-order SVD), and reuse steps: "reuse" after a
    first-order refresh (the correction is D alone), "reuse2a" the first step after a second-order
    refresh (it may wait for the host eigendecompositions), "reuse2" the others (D + rank-r factors
    in the kernel's epilogue)."""
    warm_steps = int(round(0.1 * steps)) if settings.warmup_steps is None else int(settings.warmup_steps)
    kinds, refreshes, last = [], 0, None
    for i in range(steps):
        if i < warm_steps:
            kinds.append("dense")
        elif (i - warm_steps) % settings.tau == 0:
            last = "refresh1" if refreshes == 0 or settings.order < 2 else "refresh2"
            kinds.append(last)
            refreshes += 1
        elif last == "refresh2":
            kinds.append("reuse2a" if kinds[-1] == "refresh2" else "reuse2")
        else:
            kinds.append("reuse")
    return kinds, warm_steps


class ResolutionRun:
    """All step configurations at one resolution."""

    def __init__(self, rep, budget, res, fuse_ok):
        self.rep, self.budget, self.res = rep, budget, res
        self.inp = make_inputs(RESOLUTIONS[res])
        self.rows = rep.data["steps"].setdefault(res, [])
        self.amort = rep.data["amortized"].setdefault(res, [])
        self.t = {}          # measured step seconds by key
        self.fuse_ok = fuse_ok
        self.sparse_act = 0       # bytes a sparse run needed besides weights and cache (measured)
        self.dense_guess = 26.0 * (self.inp.tokens / 119056) ** 1.7

    def est(self, steps):
        return steps * self.t.get("b", self.dense_guess) * 1.1 + 3

    def row(self, config, step, s, peak, notes=""):
        r = dict(config=config, step=step, s=s, peak_gb=peak, notes=notes, tokens=f"{self.inp.tokens:,}")
        self.rows.append(r)
        log(f"[{self.res}] {config} | {step} | {s if isinstance(s, str) else f'{s:.2f} s'} | "
            f"peak {peak if isinstance(peak, str) else f'{peak:.1f} GB'} | {notes}")
        self.rep.save()

    def skip(self, config, why):
        self.row(config, "-", "skipped", "-", why)

    def dense(self, model, key, config, masked=False, ref=None):
        try:
            return self._dense(model, key, config, masked, ref)
        except Exception as e:
            traceback.print_exc()
            self.row(config, "-", "failed", "-", f"{type(e).__name__}: {str(e)[:200]}")
            free_cuda()
            return None, None

    def _dense(self, model, key, config, masked=False, ref=None):
        if not self.budget.allows(self.est(1.6 if masked else 1.2)):
            return self.skip(config, "time budget"), None
        free_cuda()
        warm(model, self.inp, masked=masked)
        torch.cuda.reset_peak_memory_stats()
        s, out = timed_step(model, self.inp, None, masked)
        self.t[key] = s
        notes = ""
        finite = bool(torch.isfinite(out).all())
        if ref is not None:
            notes = f"output rel. diff vs (b) eager {rel_err(out, ref):.3g}"
        self.rep.check(f"[{self.res}] {config}: step output finite", 0.0 if finite else 1.0, 0.0)
        self.row(config, "dense", s, torch.cuda.max_memory_allocated() / GB, notes)
        return s, out

    def placement(self, model_act_peak):
        """Cache placement from free memory minus the step's working memory: the dense step's
        activation peak at first, then what a sparse run needed on top of weights and cache (refresh
        steps hold full, sparse and residual tensors at once), whichever is larger, + 4 GiB."""
        free_cuda()
        free = torch.cuda.mem_get_info()[0]
        headroom = max(model_act_peak, self.sparse_act) + 4 * 2 ** 30
        budget = max(0, free - headroom)
        layers = 60 - SparseSettings().warmup_blocks
        chosen = choose_placement(self.inp.tokens, HIDDEN, layers, budget, 1, 16, HEADS, tensors=1, factor_rank=16)
        return chosen, free, budget

    def sparse(self, model, config, density, dense_key, act_peak, ref=None):
        try:
            return self._sparse(model, config, density, dense_key, act_peak, ref)
        except Exception as e:  # e.g. out of memory: report it and go on with the next configuration
            traceback.print_exc()
            self.row(config, "-", "failed", "-", f"{type(e).__name__}: {str(e)[:200]}")
            free_cuda()

    def _sparse(self, model, config, density, dense_key, act_peak, ref=None):
        if not self.budget.allows(self.est(SPARSE_STEPS)):
            return self.skip(config, "time budget")
        try:
            chosen, free, budget = self.placement(act_peak)
        except ValueError as e:
            return self.skip(config, f"no cache placement fits: {e}")
        settings = SparseSettings(density=density, placement=chosen)
        ssar = SSARAttention(settings)
        kinds, warm_steps = schedule(settings)
        probes = []
        for kind in ("refresh1", "reuse", "refresh2", "reuse2a", "reuse2"):  # in step order
            if kind in kinds:
                probes.append((kinds.index(kind), kind))
        times = {}
        weights = torch.cuda.memory_allocated()
        with model.attention(ssar):
            # every kernel variant the timed steps use (the second-order reuse step's low-rank epilogue too)
            warm(model, self.inp, [i for i, kind in probes if kind != "reuse2"])
            ssar.reset()
            free_cuda()
            torch.cuda.reset_peak_memory_stats()
            for idx, kind in probes:  # the reuse steps between them change no SSAR state: not run
                s, out = timed_step(model, self.inp, idx)
                times[kind] = s
                note = ""
                if kind == "reuse" and ref is not None:
                    note = f"output rel. diff vs dense {rel_err(out, ref):.3g}"
                if kind == "refresh2":
                    note = (f"cache placement {chosen} (free {free / GB:.1f} GB, budget {budget / GB:.1f} GB after "
                            f"{(free - budget) / GB:.1f} GB headroom), cache holds {ssar._store.nbytes() / GB:.1f} GB, "
                            f"mask density {ssar.stats['sparse_density'] / max(ssar.stats['sparse'], 1):.3f}")
                if kind == "reuse2a":
                    note = "first step after a second-order refresh (waits for any host eigh still running)"
                self.row(config, f"{kind} (step {idx})", s, torch.cuda.max_memory_allocated() / GB, note)
                del out
        peak = torch.cuda.max_memory_allocated() / GB
        self.sparse_act = max(self.sparse_act, torch.cuda.max_memory_allocated() - weights - ssar._store.nbytes())
        ssar.reset()
        del ssar
        free_cuda()
        times["dense"] = self.t[dense_key]
        for kind, stand_in in (("reuse2", "reuse2a"), ("reuse2a", "reuse2"), ("reuse2", "reuse"), ("reuse2a", "reuse")):
            if kind not in times and stand_in in times:   # a kind this schedule lacks but a what-if needs
                times[kind] = times[stand_in]
        per_step = sum(times[k] for k in kinds) / len(kinds)
        counts = {k: kinds.count(k) for k in ("dense", "refresh1", "refresh2") + REUSE_KINDS}
        reuse_n = " + ".join(str(counts[k]) for k in REUSE_KINDS)
        self.amort.append(dict(config=config, per_step=per_step, total=per_step * len(kinds), peak_gb=peak,
                               schedule=f"{counts['dense']} / {counts['refresh1']} / {counts['refresh2']} / {reuse_n}",
                               vs_a=_ratio(self.t.get("a"), per_step), vs_b=_ratio(self.t.get("b"), per_step),
                               vs_b_fused=_ratio(self.t.get("b_fused"), per_step), dense_from=dense_key))
        # Where the 50 steps' time goes, and the ceiling if reuse steps cost nothing (Amdahl).
        total = per_step * len(kinds)
        parts = {k: counts[k] * times.get(k, 0.0) for k in counts}
        reuse_part = sum(parts[k] for k in REUSE_KINDS)
        floor = total - reuse_part
        self.amort[-1]["shares"] = (f"dense {parts['dense'] / total:.0%}, refresh "
                                    f"{(parts['refresh1'] + parts['refresh2']) / total:.0%}, reuse {reuse_part / total:.0%}")
        self.amort[-1]["ceiling_vs_a"] = _ratio(self.t.get("a"), floor / len(kinds))
        # The same measured step kinds under other refresh intervals / warm-up lengths (what a user
        # trading fidelity for speed would get; their fidelity on the tiny model is in docs/RESULTS.md).
        whatif = []
        for tau in WHATIF_TAUS:
            for warm_n in WHATIF_WARMUPS:
                k2, _ = schedule(SparseSettings(density=density, tau=tau, warmup_steps=warm_n))
                ps = sum(times[k] for k in k2) / len(k2)
                whatif.append(dict(tau=tau, warmup=warm_n, per_step=ps, vs_a=_ratio(self.t.get("a"), ps),
                                   vs_b=_ratio(self.t.get("b"), ps)))
        self.amort[-1]["whatif"] = whatif
        self.rep.save()

    def dense_amortized(self):
        rows = []
        for key, name in (("a", "(a) dense bf16, ComfyUI-style masked SDPA"), ("b", "(b) dense bf16 cuDNN, eager"),
                          ("b_fused", "(b') dense bf16 cuDNN, fused small ops"), ("c", "(c) W4A8, cuDNN")):
            if key in self.t and (key != "b_fused" or self.t["b_fused"] is not self.t.get("b")):
                s = self.t[key]
                rows.append(dict(config=name, per_step=s, total=s * STEPS, schedule="50 dense",
                                 vs_a=_ratio(self.t.get("a"), s), vs_b=_ratio(self.t.get("b"), s),
                                 vs_b_fused=_ratio(self.t.get("b_fused"), s)))
        self.amort[:0] = rows

    def run(self):
        rep, res = self.rep, self.res
        log(f"==== {res}: {self.inp.tokens:,} tokens ====")
        free_cuda()
        model = build_bf16()
        weights = torch.cuda.memory_allocated()
        rep.note(f"[{res}] bf16 model resident: {weights / GB:.1f} GB")
        _, out_a = self.dense(model, "a", "(a) dense bf16, SDPA with ComfyUI's text mask", masked=True)
        del out_a
        _, ref = self.dense(model, "b", "(b) dense bf16, cuDNN SDPA, eager small ops")
        act_peak = (self.rows[-1]["peak_gb"] * GB - weights) if "b" in self.t else 12 * GB
        fused = False
        if self.fuse_ok[0]:
            model.fuse_small_ops()
            try:
                t0 = time.perf_counter()
                warm(model, self.inp)
                fused = True
                rep.note(f"[{res}] fused small ops: first (compiling) warm-up of 2+2 blocks took "
                         f"{time.perf_counter() - t0:.1f} s")
            except Exception as e:
                self.fuse_ok[0] = False
                model.fuse_small_ops(False)
                rep.note(f"fused small ops failed, running eager: {type(e).__name__}: {str(e)[:300]}")
        if fused:
            self.dense(model, "b_fused", "(b') dense bf16, cuDNN SDPA, fused small ops", ref=ref)
        else:
            self.t["b_fused"] = self.t.get("b")
        dkey = "b_fused" if fused else "b"
        tag = "fused" if fused else "eager"
        self.sparse(model, f"(d) bf16 + sparse 15% + SSAR, {tag}", 0.15, dkey, act_peak, ref)
        if not self.budget.allows(self.est(1.2) + 15):
            self.skip("(c) W4A8", "time budget")
            self.skip("(e) W4A8 + sparse 15% + SSAR", "time budget")
        else:
            t0 = time.perf_counter()
            policy = to_w4a8(model)
            meta = HunyuanVideoDiT(get_preset("hunyuan-video-13b"), device="meta")
            sb = storage_bytes(meta, default_policy(meta))
            rep.note(f"[{res}] W4A8 conversion {time.perf_counter() - t0:.1f} s ({len(policy)} linears): resident "
                     f"{torch.cuda.memory_allocated() / GB:.1f} GB on the GPU; checkpoint payload "
                     f"{sb['total'] / GB:.2f} GB vs bf16 {sb['bf16_total'] / GB:.2f} GB")
            _, qout = self.dense(model, "c", f"(c) W4A8, cuDNN SDPA, {tag}", ref=ref)
            if qout is not None:
                del qout
            if "c" in self.t:
                self.sparse(model, f"(e) W4A8 + sparse 15% + SSAR, {tag}", 0.15, "c", act_peak, ref)
        # Lowest priority: the 25% bf16 configuration, on a rebuilt bf16 model (same seed, same weights).
        d25 = f"(d) bf16 + sparse 25% + SSAR, {tag}"
        if self.budget.allows(self.est(SPARSE_STEPS) + 10):
            del model
            free_cuda()
            model = build_bf16()
            model.fuse_small_ops(fused)
            self.sparse(model, d25, 0.25, dkey, act_peak, ref)
        else:
            self.skip(d25, "time budget")
        self.dense_amortized()
        del model, ref
        free_cuda()
        rep.save()


def _ratio(base, x):
    return None if base is None or not x else base / x


# ---- main --------------------------------------------------------------------------------------
def product(argv):
    """`--product ARGS`: the product path instead (HunyuanVideo-13B through ComfyUI's own loader and sampler,
    in-process): every other argument goes to benchmarks/comfy_product.py (see its --help)."""
    spec = importlib.util.spec_from_file_location("comfy_product", Path(__file__).with_name("comfy_product.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([a for a in argv if a != "--product"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--product" in argv:
        return product(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="--product [ARGS]: run benchmarks/comfy_product.py (ComfyUI in-process) with ARGS")
    ap.add_argument("--resolutions", default="720p,544p", help="comma list of 720p, 544p")
    ap.add_argument("--out", default=None, help="markdown file for the tables (a .json with raw numbers beside it)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="wall-clock budget; configurations that would not fit are reported as skipped")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernels-alone section (= --kernels none)")
    ap.add_argument("--kernels", choices=("all", "attention", "linears", "none"), default="all",
                    help="kernels-alone sections to run: all, attention only (sparse kernel + SSAR refresh pieces), linears only (GEMMs, linears, activation quantization), none")
    ap.add_argument("--no-fuse", action="store_true", help="run the model's small ops eagerly only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_benchmark.py needs a CUDA GPU (H100/H200 class, >= 80 GB): none is visible to torch "
                 f"{torch.__version__}. Run it on a GPU machine; the CPU tests are `./run tests`.")
    res_list = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    bad = [r for r in res_list if r not in RESOLUTIONS]
    if bad:
        sys.exit(f"unknown resolution(s) {bad}; choose from {sorted(RESOLUTIONS)}")
    budget = Budget(args.budget_s)
    rep = Report(args.out)
    environment(rep, sys.argv[1:] if argv is None else argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    mods = {}
    for name in ("act_quant", "int_gemm", "sparse_attention"):
        mods[name], err = try_import(f"quantsparse_kernels.{name}")
        if err:
            rep.note(f"quantsparse_kernels.{name} not available: {err}")
    if mods["sparse_attention"] is None:
        rep.note("SSARAttention falls back to the PyTorch reference for sparse attention")
    try:
        check_cudnn_layouts(rep)
        check_kernels(rep, mods)
        check_ssar_density_one(rep)
    except Exception as e:
        rep.note(f"correctness checks raised {type(e).__name__}: {e}")
        traceback.print_exc()
    rep.save()
    sections = {"all": ("attention", "linears"), "attention": ("attention",), "linears": ("linears",), "none": ()}[
        "none" if args.no_kernels else args.kernels]
    for name, fn, a in (("attention", bench_attention, (rep, mods["sparse_attention"])),
                        ("linears", bench_linears, (rep, mods["act_quant"], mods["int_gemm"]))):
        if name not in sections:
            continue
        try:
            fn(*a)
        except Exception as e:
            rep.note(f"{fn.__name__} raised {type(e).__name__}: {e}")
            traceback.print_exc()
        free_cuda()
        rep.save()
    log(f"kernels done at {budget.elapsed():.0f} s")
    fuse_ok = [not args.no_fuse]
    for res in res_list:
        try:
            ResolutionRun(rep, budget, res, fuse_ok).run()
        except Exception as e:
            rep.note(f"[{res}] step benchmark raised {type(e).__name__}: {str(e)[:500]}")
            traceback.print_exc()
            free_cuda()
        rep.save()
    failed = [c["check"] for c in rep.data["checks"] if not c["ok"]]
    rep.save()
    log("\n" + rep.markdown())
    log(f"total {budget.elapsed():.0f} s; failed checks: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""INT8 dense attention (kernels/int8_attention.py) against cuDNN bf16 SDPA, at HunyuanVideo-13B sizes.

    python benchmarks/int8_attention_bench.py [--sizes 720p,544p] [--reps 3] [--out FILE]
    python benchmarks/int8_attention_bench.py --sweep [--sweep-size 720p] [--budget-s 420]
    python benchmarks/int8_attention_bench.py --smoke        # CPU, Triton's interpreter, tiny sizes

Per size (720p: 119,056 tokens, 544p: 67,576; 24 heads, D = 128, bf16 [1, H, L, D]): the INT8 output
is first checked against the cuDNN bf16 SDPA output (relative Frobenius error; the run stops with an
error above MAX_REL_ERR), then CUDA-event medians of: cuDNN SDPA (SDPBackend.CUDNN_ATTENTION; the
default SDPA backends where cuDNN is unavailable, named in the result), the INT8 path with its
quantisation (what a model call costs), the attention kernel alone on precomputed codes, and the
quantisation alone; and, where comfy-kitchen's INT8 attention loads (the attention ComfyUI >= 0.33 runs with
--use-ck-attention; PYTHONPATH=.devcarry/site, its CUDA extension unpacked from the carry), that kernel unmasked
and with HunyuanVideo's text mask (TEXT_PADDED of the last keys blocked, an additive [1, 1, L] mask as ComfyUI
passes it), each checked against SDPA first. Target (issue 20): INT8 at least TARGET x faster than cuDNN bf16
at 720p.
--sweep times the attention kernel alone over BLOCK_M / BLOCK_N / num_warps / num_stages (and the
K scale block, which must be a multiple of BLOCK_N), each candidate checked first, and prints the best.
The table is printed and the results written as JSON (--out, default out/int8_attention_bench.json).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = {"720p": 119056, "544p": 67576}
HEADS, HEAD_DIM = 24, 128
MAX_REL_ERR = 5e-2
TARGET = 1.5
K_OFFSET = 1.0  # a shared per-channel key offset (in sigmas), as DiT keys carry: smoothing is exercised
TEXT_PADDED = 56  # HunyuanVideo's benchmark text: 256 tokens, 200 real (benchmarks/comfy_product.py)


def _kitchen_int8():
    """comfy_kitchen's INT8 attention function where it runs on this GPU, else None (and why, printed). Its CUDA
    extension travels xz-compressed in .devcarry: unpacked here as benchmarks/comfy_product.py does."""
    import importlib.util
    if importlib.util.find_spec("comfy_kitchen") is None:
        print("comfy_kitchen not importable (PYTHONPATH=.devcarry/site): its INT8 attention is not timed", flush=True)
        return None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from comfy_product import unpack_kitchen_cuda
    print(f"comfy_kitchen CUDA extension: {unpack_kitchen_cuda()}", flush=True)
    try:
        from comfy_kitchen import sage_attention
    except ImportError as e:  # comfy_kitchen before its INT8 attention (0.2.24, carried for ComfyUI 0.29)
        print(f"comfy_kitchen has no INT8 attention here ({e}): not timed", flush=True)
        return None
    if not sage_attention.is_available():
        print("comfy_kitchen's INT8 attention is unavailable on this GPU: not timed", flush=True)
        return None
    return sage_attention.int8_attention


def _timer(device):
    """Median milliseconds of fn(): CUDA events on a GPU, wall clock on the CPU."""
    import torch

    def run(fn, reps: int, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def _sdpa(device):
    """(a callable q, k, v -> [B, H, L, D] bf16 SDPA, the backend's name): cuDNN where torch has it
    and it runs here, else torch's default choice."""
    import torch
    import torch.nn.functional as F
    if device.type == "cuda":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            probe = torch.randn(1, 1, 256, HEAD_DIM, device=device, dtype=torch.bfloat16)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(probe, probe, probe)

            def cudnn(q, k, v):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v)
            return cudnn, "cuDNN"
        except (ImportError, RuntimeError) as e:
            print(f"cuDNN SDPA unavailable ({type(e).__name__}: {e}); timing the default SDPA backend", flush=True)
    return F.scaled_dot_product_attention, "default SDPA"


def _inputs(n_tokens, heads, d, device, seed=0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n_tokens, d, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    k += (K_OFFSET * torch.randn(1, heads, 1, d, device=device, generator=g)).to(k.dtype)
    return q, k, v


def _rel_err(out, ref) -> float:
    """out [B, L, H*D] against ref [B, H, L, D], relative Frobenius error in fp32 (per head: no full copy)."""
    b, heads, length, d = ref.shape
    o = out.view(b, length, heads, d)
    num = den = 0.0
    for h in range(heads):
        r = ref[:, h].float()
        num += float((o[:, :, h].float() - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def _compiled_stats(jit_fn) -> list:
    """Per compiled variant of a Triton kernel: registers, spills, shared memory and PTX instruction
    counts (tensor-core MMAs, vector/scalar global loads, async copies), to tell a tile that loads
    element by element or spills from one that is merely slow."""
    import re
    kernels = []
    for entry in (getattr(jit_fn, "device_caches", None) or {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        kernels += list(getattr(cache, "values", lambda: [])())
    stats = []
    for k in kernels:
        ptx = (getattr(k, "asm", None) or {}).get("ptx", "") or ""
        count = lambda pattern: len(re.findall(pattern, ptx))  # noqa: E731
        md = getattr(k, "metadata", None)
        stats.append(dict(n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None),
                          shared=getattr(md, "shared", None), num_warps=getattr(md, "num_warps", None),
                          wgmma=count(r"wgmma\.mma_async"), mma_sync=count(r"\bmma\.sync"),
                          ld_global_v4=count(r"ld\.global[^;]*\.v4"), ld_global=count(r"ld\.global"),
                          cp_async=count(r"cp\.async\.(?:ca|cg)"), tma=count(r"cp\.async\.bulk\.tensor")))
    return stats


def _triton_bf16_dense_ms(q, k, v, timed, reps: int) -> float:
    """Our bf16 block-sparse Triton kernel with every key block listed (dense): what Triton reaches in
    bf16 on this GPU, the yardstick for the INT8 kernel (same language, same tiles budget)."""
    import torch
    from quantsparse_kernels.sparse_attention import sparse_attention
    heads, length = q.shape[1], q.shape[2]
    nb = -(-length // 128)
    index = torch.arange(nb, dtype=torch.int32, device=q.device).expand(heads, nb, nb).contiguous()
    count = torch.full((heads, nb), nb, dtype=torch.int32, device=q.device)
    out = sparse_attention(q, k, v, index, count)
    return timed(lambda: sparse_attention(q, k, v, index, count, out=out), reps)


def bench_int8_attention(n_tokens: int = 119056, heads: int = HEADS, d: int = HEAD_DIM, reps: int = 3,
                         config=None, q_block=None, k_block=None, device=None) -> dict:
    """One size: error check against SDPA bf16 (RuntimeError above MAX_REL_ERR), then the timings (ms)
    of SDPA, INT8 with quantisation, the INT8 kernel alone, the quantisation alone, and the ratios."""
    import torch
    from quantsparse_kernels.int8_attention import int8_attention, int8_attention_codes, quantize_qk
    from quantsparse_kernels.int8_attention_ref import K_BLOCK, Q_BLOCK
    device = torch.device(device or "cuda")
    q_block, k_block = q_block or Q_BLOCK, k_block or K_BLOCK
    q, k, v = _inputs(n_tokens, heads, d, device)
    sdpa, backend = _sdpa(device)
    timed = _timer(device)
    with torch.no_grad():
        ref = sdpa(q, k, v)
        out = int8_attention(q, k, v, q_block=q_block, k_block=k_block, config=config)
        err = _rel_err(out, ref)
        if not err <= MAX_REL_ERR:
            raise RuntimeError(f"INT8 attention is off: relative error {err:.3g} against {backend} bf16 SDPA at "
                               f"{n_tokens} tokens (limit {MAX_REL_ERR}); no timing is reported for a wrong kernel")
        del ref
        qk = quantize_qk(q, k, q_block=q_block, k_block=k_block)
        sdpa_ms = timed(lambda: sdpa(q, k, v), reps)
        int8_ms = timed(lambda: int8_attention(q, k, v, q_block=q_block, k_block=k_block, config=config, out=out), reps)
        kernel_ms = timed(lambda: int8_attention_codes(qk, v, out=out, config=config), reps)
        quant_ms = timed(lambda: quantize_qk(q, k, q_block=q_block, k_block=k_block), reps)
        triton_bf16_ms = _triton_bf16_dense_ms(q, k, v, timed, reps) if device.type == "cuda" else None
        kitchen = _kitchen_int8() if device.type == "cuda" else None
        ck = {}
        if kitchen is not None:
            mask = torch.zeros(1, 1, 1, n_tokens, device=device, dtype=q.dtype)
            mask[..., n_tokens - TEXT_PADDED:] = torch.finfo(q.dtype).min  # as ComfyUI's HunyuanVideo blocks padding
            ref = sdpa(q, k, v)
            ck["kitchen_rel_err"] = _rel_err(kitchen(q, k, v).transpose(1, 2).reshape(1, n_tokens, -1), ref)
            del ref
            ref = sdpa(q, k[:, :, :n_tokens - TEXT_PADDED], v[:, :, :n_tokens - TEXT_PADDED])
            ck["kitchen_masked_rel_err"] = _rel_err(
                kitchen(q, k, v, attn_mask=mask).transpose(1, 2).reshape(1, n_tokens, -1), ref)
            del ref
            if max(ck.values()) > MAX_REL_ERR:
                raise RuntimeError(f"comfy kitchen's INT8 attention is off against SDPA: {ck} (limit {MAX_REL_ERR})")
            ck["kitchen_ms"] = timed(lambda: kitchen(q, k, v), reps)
            ck["kitchen_masked_ms"] = timed(lambda: kitchen(q, k, v, attn_mask=mask), reps)
            ck["kitchen_speedup"] = sdpa_ms / ck["kitchen_ms"]
    from quantsparse_kernels import int8_attention as kernel_module
    compiled = _compiled_stats(kernel_module._int8_attn_fwd) if device.type == "cuda" else []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    return dict(n_tokens=n_tokens, heads=heads, head_dim=d, device=name, baseline=f"{backend} bf16",
                config=list(config) if config else None, q_block=q_block, k_block=k_block, rel_err_vs_sdpa=err,
                sdpa_ms=sdpa_ms, int8_ms=int8_ms, int8_kernel_ms=kernel_ms, quant_ms=quant_ms,
                speedup=sdpa_ms / int8_ms, speedup_kernel_only=sdpa_ms / kernel_ms, target=TARGET,
                target_met=sdpa_ms / int8_ms >= TARGET, triton_bf16_dense_ms=triton_bf16_ms,
                int8_kernel_compiled=compiled, **ck)


def sweep_candidates():
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, k_block): every tile shape the MMAs take at D = 128."""
    # the likeliest Hopper shapes first, so a --budget-s that stops early has tried them
    for bm, bn, warps, stages in itertools.product((128, 64), (64, 128, 32), (8, 4), (3, 2, 4)):
        yield bm, bn, warps, stages, max(64, bn)


def sweep(n_tokens: int = SIZES["720p"], heads: int = HEADS, d: int = HEAD_DIM, reps: int = 3,
          budget_s: float = 420.0, device=None, candidates=None) -> list:
    """The attention kernel alone (quantisation excluded, codes made per K block) per candidate, each
    checked against SDPA bf16 first; candidates that fail to compile or to check are reported, not
    timed. Stops when budget_s is spent. Sorted fastest first."""
    import torch
    from quantsparse_kernels.int8_attention import int8_attention_codes, quantize_qk
    device = torch.device(device or "cuda")
    q, k, v = _inputs(n_tokens, heads, d, device)
    sdpa, backend = _sdpa(device)
    timed = _timer(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = sdpa(q, k, v)
        sdpa_ms = timed(lambda: sdpa(q, k, v), reps)
        codes, rows = {}, []
        for bm, bn, warps, stages, kb in (candidates or list(sweep_candidates())):
            if time.perf_counter() - t0 > budget_s:
                rows.append(dict(config=[bm, bn, warps, stages], k_block=kb, status="skipped (budget)"))
                continue
            row = dict(config=[bm, bn, warps, stages], k_block=kb)
            try:
                if kb not in codes:
                    codes[kb] = quantize_qk(q, k, k_block=kb)
                out = int8_attention_codes(codes[kb], v, config=(bm, bn, warps, stages))
                row["rel_err_vs_sdpa"] = err = _rel_err(out, ref)
                if not err <= MAX_REL_ERR:
                    row["status"] = f"wrong (relative error {err:.3g})"
                else:
                    row["ms"] = timed(lambda: int8_attention_codes(codes[kb], v, out=out, config=(bm, bn, warps, stages)),
                                      reps)
                    row["speedup_vs_sdpa"] = sdpa_ms / row["ms"]
                    row["status"] = "ok"
            except Exception as e:  # out of shared memory, a tile the MMA refuses: reported, not timed
                row["status"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            print(f"  sweep {row}", flush=True)
            rows.append(row)
    rows.sort(key=lambda r: r.get("ms", float("inf")))
    return [dict(n_tokens=n_tokens, baseline=f"{backend} bf16", sdpa_ms=sdpa_ms)] + rows


def _table(results) -> str:
    lines = ["| tokens | baseline | SDPA ms | INT8 ms (with quant) | INT8 kernel ms | quant ms | speed-up | "
             "kernel only | Triton bf16 dense ms | rel. err vs SDPA | kitchen INT8 ms (masked) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tb = r.get("triton_bf16_dense_ms")
        ck = (f"{r['kitchen_ms']:.1f} ({r['kitchen_masked_ms']:.1f}), {r['kitchen_speedup']:.3f}x"
              if "kitchen_ms" in r else "-")
        lines.append(f"| {r['n_tokens']:,} | {r['baseline']} | {r['sdpa_ms']:.1f} | {r['int8_ms']:.1f} | "
                     f"{r['int8_kernel_ms']:.1f} | {r['quant_ms']:.2f} | {r['speedup']:.3f}x | "
                     f"{r['speedup_kernel_only']:.3f}x | {'-' if tb is None else f'{tb:.1f}'} | "
                     f"{r['rel_err_vs_sdpa']:.2e} | {ck} |")
    for r in results[:1]:
        for c in r.get("int8_kernel_compiled") or []:
            lines.append(f"compiled INT8 kernel: {c}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="720p,544p", help=f"comma-separated names of {sorted(SIZES)} or token counts")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--config", default=None, help="BLOCK_M/BLOCK_N/WARPS/STAGES[/K_BLOCK] override")
    ap.add_argument("--lazy", action="store_true", help="the kernel's lazy rescaling (int8_attention.LAZY) on")
    ap.add_argument("--sweep", action="store_true", help="tune the attention kernel's tiles at --sweep-size")
    ap.add_argument("--sweep-size", default="720p")
    ap.add_argument("--budget-s", type=float, default=420.0, help="--sweep stops starting candidates after this")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes: checks that it runs")
    ap.add_argument("--out", default=str(ROOT / "out" / "int8_attention_bench.json"))
    args = ap.parse_args(argv)
    if args.smoke:  # before any kernel module is imported: Triton reads it when the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import importlib
    import torch
    importlib.import_module("quantsparse_core.dispatch")  # makes the kernels importable as quantsparse_kernels

    def size(s):
        return SIZES[s] if s in SIZES else int(s)
    config, k_block = None, None
    if args.config:
        parts = [int(x) for x in args.config.split("/")]
        config, k_block = tuple(parts[:4]), (parts[4] if len(parts) > 4 else None)
    report = dict(command=" ".join(sys.argv), time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  torch=torch.__version__)
    if args.smoke:
        device, heads, d = "cpu", 2, 64
        sizes = [200]
        cands = [(32, 16, 4, 2, 32), (64, 32, 4, 2, 64)]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke on a CPU", file=sys.stderr)
            return 2
        device, heads, d = "cuda", HEADS, HEAD_DIM
        sizes = [size(s) for s in args.sizes.split(",") if s]
        cands = None
    if args.lazy:  # the tile given (or the default one) with its 5th element, lazy rescaling
        from quantsparse_kernels.int8_attention import _CONFIGS
        config = (*(config or _CONFIGS[d]), True)
        report["lazy"] = True
    if args.sweep:
        n = sizes[0] if args.smoke else size(args.sweep_size)
        rows = sweep(n, heads, d, args.reps, args.budget_s, device, cands)
        report["sweep"] = rows
        best = next((r for r in rows[1:] if r.get("status") == "ok"), None)
        print(f"\nsweep at {n:,} tokens, {rows[0]['baseline']} {rows[0]['sdpa_ms']:.1f} ms; best: "
              + (f"config {tuple(best['config'])} k_block {best['k_block']}: {best['ms']:.1f} ms = "
                 f"{best['speedup_vs_sdpa']:.3f}x" if best else "none passed"))
    else:
        results = []
        for n in sizes:
            r = bench_int8_attention(n, heads, d, args.reps, config=config, k_block=k_block, device=device)
            results.append(r)
            print(f"{n:,} tokens: {r}", flush=True)
        report["results"] = results
        report["targets"] = [dict(name=f"INT8 dense attention >= {TARGET}x {r['baseline']} at {r['n_tokens']:,} tokens",
                                  value=round(r["speedup"], 3), target=TARGET, met=r["target_met"])
                             for r in results if r["n_tokens"] == SIZES["720p"]]
        print("\n" + _table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

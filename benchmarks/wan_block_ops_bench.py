"""The fused Wan block's small-op kernels against the unfused sequences they replace (GPU diagnostic).

Why: the fused Wan block (quantsparse_core/models/fusion_wan.py, 2026-12-08) replaces, per block, (a) q and k's
whole-width RMSNorm + RoPE (two norms and two RoPE passes) by one in-place kernel, and (b) the modulated
LayerNorm that q/k/v read plus one act_quant pass per quantized consumer (three for an RTN checkpoint's q, k, v)
by one producer pass per distinct input quantization. The product benchmark (comfy_product.py --preset
wan2.1-14b) measures the whole step; this names what each replacement gains at Wan2.1-14B's shapes, each against
the sequence it replaces in the same run, and checks the outputs agree.

    python3 benchmarks/wan_block_ops_bench.py [--size 720p|480p|small] [--reps 5] [--out PATH]

Prints ms and ratios, writes JSON. --size small runs under the Triton interpreter on the CPU (checks only).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from int8_attention_bench import _timer  # noqa: E402  (median of CUDA-event timings; wall clock on the CPU)
from sparse_conditions_bench import write_result  # noqa: E402

# Wan2.1-14B: 40 heads x 128; 720p x 81 frames = 21 x 45 x 80 tokens, 480p = 21 x 30 x 52. small: interpreter checks.
SIZES = {"720p": ((21, 45, 80), 40), "480p": ((21, 30, 52), 40), "small": ((2, 3, 4), 2)}
HEAD_DIM, EPS = 128, 1e-6


def run(size: str, reps: int, device) -> dict:
    import torch
    import torch.nn.functional as F
    from quantsparse_core.models.fusion_wan import wan_qk_torch
    from quantsparse_core.models.wan import wan_rope
    from quantsparse_kernels.act_quant import act_quant
    from quantsparse_kernels.producer_quant import norm_modulate_quant
    from quantsparse_kernels.wan_qk_norm_rope import wan_qk

    grid, heads = SIZES[size]
    n, c = math.prod(grid), heads * HEAD_DIM
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    timed = _timer(device)

    def randn(*shape, s=1.0):
        return torch.randn(*shape, device=device, generator=g, dtype=dt) * s

    out = dict(size=size, tokens=n, width=c, heads=heads, rows=[])

    def row(name, base_fn, fused_fn, agree):
        base_ms, fused_ms = timed(base_fn, reps), timed(fused_fn, reps)
        r = dict(op=name, unfused_ms=base_ms, fused_ms=fused_ms, speedup=base_ms / fused_ms, agree=agree)
        out["rows"].append(r)
        print(f"  {name:58s} unfused {base_ms:8.3f} ms  fused {fused_ms:8.3f} ms  {r['speedup']:5.2f}x  "
              f"{'agree' if agree else 'DISAGREE'}", flush=True)

    def qk_norm_rope():  # (a) q/k RMSNorm over the width + RoPE per head; its tensors go when it returns
        q, k = randn(1, n, c, s=2.0), randn(1, n, c, s=2.0)
        wq, wk = (torch.rand(c, device=device, generator=g).to(dt) + 0.5 for _ in range(2))
        d = HEAD_DIM
        table = wan_rope(grid, (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)), 10000.0, device)
        ref = wan_qk_torch(q, k, heads, wq, wk, table, EPS)
        got = wan_qk(q, k, heads, wq, wk, table, EPS)
        unit = torch.finfo(dt).eps * 4  # a rounding flip, relative to the pair's size (test_kernel_wan_qk_norm_rope)
        agree = all(float((a.float() - b.float()).abs().max() / b.float().abs().max()) <= unit
                    for a, b in zip(got, ref))
        del got, ref
        qi, ki = q.clone(), k.clone()
        row("q/k RMSNorm + RoPE (PyTorch ops -> one kernel, in place)",
            lambda: wan_qk_torch(q, k, heads, wq, wk, table, EPS),
            lambda: wan_qk(qi, ki, heads, wq, wk, table, EPS, inplace=True), agree)

    qk_norm_rope()

    # (b) the q/k/v input: LayerNorm + modulation, then per-token int8 quantization for each consumer
    x = randn(1, n, c, s=3.0)
    shift, scale = randn(1, 1, c, s=0.3), randn(1, 1, c, s=0.3)

    def unfused(consumers):
        h = torch.addcmul(shift, F.layer_norm(x, (c,), eps=1e-6), 1 + scale)
        return [act_quant(h, 8, None, clip) for clip in consumers]

    def fused(consumers):
        return [norm_modulate_quant(x, shift, scale, None, clip, 8)[1:] for clip in dict.fromkeys(consumers)]

    for label, consumers in (("RTN: q, k, v share one quantization", (1.0, 1.0, 1.0)),
                             ("calibrated: q, k, v clip apart", (0.9, 0.85, 0.95))):
        a, b = unfused(consumers), fused(consumers)
        b = [b[list(dict.fromkeys(consumers)).index(clip)] for clip in consumers]
        agree = all(int((p[0].int() - r[0].int()).abs().max()) <= 1 and
                    float((p[0] != r[0]).float().mean()) < 1e-3 for p, r in zip(b, a))
        row(f"q/k/v input, {label}", lambda: unfused(consumers), lambda: fused(consumers), agree)
    return out


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="720p", choices=sorted(SIZES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "out" / "wan_block_ops_bench.json"))
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and a.size != "small":
        sys.exit("no CUDA device: --size small runs the kernels under the interpreter (checks only)")
    print(f"{a.size}: {device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}", flush=True)
    res = run(a.size, a.reps, device)
    write_result(res, "wan_block_ops_bench.py", argv, a.out, device)
    return 0 if all(r["agree"] for r in res["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Where a LoRA side path's time goes on the quantized linears of one HunyuanVideo-13B step (diagnostic).

For each of the 13B's video-token linear shapes at M tokens: the W4A8 GEMM alone, the GEMM with the side
path's up projection in its epilogue (rank R), the down projection x @ down^T (cuBLAS), and the activation
quantization pass a LoRA layer runs itself (its producer then hands it bf16 instead of int8 codes). Per-step
totals weight each shape by how many such layers a step runs. "down_codes" is the down projection as it runs
where the fused blocks hand the layer int8 codes (quant.low_rank: an int8 GEMM of N = R on the codes; no
quantization pass of the layer's own). Prints a table; --out writes JSON.

    python3 benchmarks/lora_epilogue_bench.py [--tokens 119056] [--rank 96] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantsparse_core.dispatch import pack_int4  # noqa: E402
from quantsparse_kernels.act_quant import act_quant  # noqa: E402
from quantsparse_kernels.int_gemm import int_gemm, prepare_weight  # noqa: E402

# (name, K, N, layers per step): 20 double blocks (img stream) and 40 single blocks
SHAPES = [("qkv", 3072, 9216, 20), ("proj", 3072, 3072, 20), ("fc1", 3072, 12288, 20), ("fc2", 12288, 3072, 20),
          ("linear1", 3072, 21504, 40), ("linear2", 15360, 3072, 40)]


def timed(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=119056)
    ap.add_argument("--rank", type=int, default=96)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev, m, r = "cuda", a.tokens, a.rank
    rows, totals = [], dict(gemm=0.0, gemm_lora=0.0, down=0.0, down_codes=0.0, act_quant=0.0)
    for name, k, n, count in SHAPES:
        codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=dev)
        w = prepare_weight(pack_int4(codes), 4, torch.rand(n, 1, device=dev) * 1e-3)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        q, s = act_quant(x, 8)
        down = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.02
        up = torch.randn(n, r, device=dev, dtype=torch.bfloat16) * 0.02
        h = torch.nn.functional.linear(x, down)
        wd = prepare_weight(torch.randint(-127, 128, (r, k), dtype=torch.int8, device=dev), 8,
                            torch.rand(r, 1, device=dev) * 1e-3)
        y0 = int_gemm(q, s, w)
        y1 = int_gemm(q, s, w, lora=(h, up))
        err = float(((y1.float() - y0.float()) - (h.float() @ up.float().t())).abs().max()
                    / (h.float() @ up.float().t()).abs().max())
        t = dict(gemm=timed(lambda: int_gemm(q, s, w)), gemm_lora=timed(lambda: int_gemm(q, s, w, lora=(h, up))),
                 down=timed(lambda: torch.nn.functional.linear(x, down)),
                 down_codes=timed(lambda: int_gemm(q, s, wd)), act_quant=timed(lambda: act_quant(x, 8)))
        for key in totals:
            totals[key] += t[key] * count / 1000
        rows.append(dict(name=name, K=k, N=n, layers=count, ms=t, lora_term_rel_err=err))
        print(f"{name:8s} K={k:5d} N={n:5d} x{count}: gemm {t['gemm']:.2f} ms, +epilogue {t['gemm_lora'] - t['gemm']:.2f}, "
              f"down {t['down']:.2f} (from codes {t['down_codes']:.2f}), act_quant {t['act_quant']:.2f} "
              f"(term err {err:.1e})", flush=True)
        torch.cuda.empty_cache()
    print("per step (s): " + ", ".join(f"{k} {v:.3f}" for k, v in totals.items())
          + f"; side path on float input = epilogue {totals['gemm_lora'] - totals['gemm']:.3f} + down "
          + f"{totals['down']:.3f} + act_quant {totals['act_quant']:.3f}; on a producer's codes = epilogue + "
          + f"down_codes {totals['down_codes']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), tokens=m, rank=r, shapes=rows,
                                               per_step_s=totals, torch=torch.__version__), indent=1))


if __name__ == "__main__":
    main()

"""The block-sparse pass under the product's conditions, one at a time, and the refresh residual (GPU diagnostic).

Why: at 720p the kernel benchmark (quantized_attention_bench.py: q/k/v contiguous, no key mask, no
correction) times a 15% pass at 47.5 ms on an H100, while the same pass inside ComfyUI took 56.2 ms
(reuse steps, 59 layers) and 57.9 ms (refresh steps) per layer (comfy_product --profile-steps,
2026-12-08). The product adds, per call: the single blocks' v as a view of linear1's output (row
stride 3*H*D), ComfyUI's text key mask, the SSAR correction in the epilogue (int8 D + rank-16 factors),
and SVG's own head kinds. Each condition is timed alone and together, against cuDNN on the same
inputs, so the condition that costs is named before anything is changed.

    python3 benchmarks/sparse_conditions_bench.py [--size 720p] [--reps 3] [--rows plain,single-v,...] [--out PATH]

Prints a table (ms, ratio to the plain row, ratio to d x cuDNN) and writes JSON. Each row's output is
checked against the plain row's (same math: equal up to bf16 rounding; the correction rows against
plain + C). Then the gpu-int8 refresh residual per layer (D as int8 rows and D2 against the cached codes):
the PyTorch sequence the refresh ran before against kernels/residual.int8_residuals, checked equal.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from int8_attention_bench import _timer  # noqa: E402  (median of CUDA-event timings; wall clock on the CPU)

GRIDS = {"720p": (33, 45, 80), "544p": (33, 34, 60), "small": (3, 8, 8)}
HEADS, HEAD_DIM, TXT, DENSITY, RANK = 24, 128, 256, 0.15, 16


def run(size: str, reps: int, device, only=None) -> dict:
    import torch
    import torch.nn.functional as F
    from quantsparse_core.dispatch import Correction, _indices, _temporal_perm
    from quantsparse_core.sparse.masks import BlockMask, band_keep
    from quantsparse_kernels.sparse_attention import sparse_attention

    grid = GRIDS[size]
    n = TXT + math.prod(grid)
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    hd = HEADS * HEAD_DIM

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=dt)

    q, k, v = (randn(1, HEADS, n, HEAD_DIM) for _ in range(3))
    # the single blocks' v: a [B, H, L, D] view of linear1's q|k|v output, rows 3*H*D apart
    qkv = randn(1, n, 3 * hd)
    qkv[..., 2 * hd:] = v.transpose(1, 2).reshape(1, n, hd)
    v_view = qkv[..., 2 * hd:].view(1, n, HEADS, HEAD_DIM).transpose(1, 2)
    bias = torch.zeros(1, n, device=device)
    bias[:, TXT // 2:TXT] = -torch.finfo(torch.float32).max  # half the text padded, as ComfyUI masks it
    codes = torch.randint(-127, 128, (1, n, hd), device=device, generator=g, dtype=torch.int8)
    scale = torch.rand(1, n, device=device, generator=g) * 1e-3
    us = torch.randn(1, HEADS, n, RANK, device=device, generator=g) * 1e-2
    vh = torch.randn(1, HEADS, RANK, HEAD_DIM, device=device, generator=g) * 1e-2
    corr = Correction(codes=codes, scale=scale, us=us, vh=vh)
    keep = band_keep(n, TXT, DENSITY)
    timed = _timer(device)
    perm = _temporal_perm(TXT, grid, device)

    def mask(kinds):
        bm = BlockMask(keep.expand(HEADS, -1, -1).clone(), kinds, 128, n)
        return bm, _indices(bm.keep, bm, device)

    half = ["spatial", "temporal"] * (HEADS // 2)
    masks = {"half": mask(half), "spatial": mask(["spatial"] * HEADS), "temporal": mask(["temporal"] * HEADS)}
    density = masks["half"][0].density()

    def call(kinds="half", vv=None, key_bias=None, correction=None, contig_v=False):
        bm, (idx, cnt) = masks[kinds]
        permuted = [bm.permuted(h) for h in range(HEADS)]
        vv = v if vv is None else vv
        if contig_v:
            vv = vv.contiguous()
        return sparse_attention(q, k, vv, idx, cnt, perm=perm if any(permuted) else None, permuted_heads=permuted,
                                key_bias=key_bias, correction=correction)

    rows = [("plain", "plain (the kernel benchmark's)", {}),
            ("spatial", "all heads spatial", dict(kinds="spatial")),
            ("temporal", "all heads temporal", dict(kinds="temporal")),
            ("single-v", "single-block v (view of linear1's output)", dict(vv=v_view)),
            ("single-v-copy", "single-block v made contiguous first (copy timed)", dict(vv=v_view, contig_v=True)),
            ("text-mask", "text key mask", dict(key_bias=bias)),
            ("correction", "correction (int8 D + rank-16 factors)", dict(correction=corr)),
            ("product", "product: single-block v + text mask + correction", dict(vv=v_view, key_bias=bias,
                                                                                  correction=corr)),
            ("product-copy", "product, v contiguous first", dict(vv=v_view, key_bias=bias, correction=corr,
                                                                  contig_v=True))]
    rows = [r[1:] for r in rows if only is None or r[0] in only]
    sdpa = (lambda vv: F.scaled_dot_product_attention(q, k, vv))
    dense_ms = timed(lambda: sdpa(v), reps)
    dense_view_ms = timed(lambda: sdpa(v_view), reps)
    base = call()
    with_c = base.float() + corr.materialize().float()
    out = dict(size=size, tokens=n, density=density, dense_ms=dense_ms, dense_single_v_ms=dense_view_ms, rows=[])
    plain_ms = None
    for name, kw in rows:
        o = call(**kw)
        ref = with_c if kw.get("correction") is not None else base.float()
        if kw.get("key_bias") is not None or kw.get("kinds", "half") != "half":
            ref = None  # another softmax (padded keys out) or mask (other kinds): the kernel tests check those
        err = None if ref is None else float((o.float() - ref).norm() / ref.norm())
        ms = timed(lambda: call(**kw), reps)
        plain_ms = plain_ms or ms
        row = dict(condition=name, ms=ms, vs_plain=ms / plain_ms, vs_d_dense=ms / (density * dense_ms), rel_err=err)
        out["rows"].append(row)
        print(f"  {name:52s} {ms:7.2f} ms  {row['vs_plain']:.3f}x plain  {row['vs_d_dense']:.3f} x d x cuDNN"
              + ("" if err is None else f"  err {err:.1e}"), flush=True)
    sparse = (base.float() + 0.05 * randn(*base.shape).float()).to(base.dtype)  # an O_sparse near O_full
    out["residual"] = residual_rows(full=base, sparse=sparse, codes=codes, scale=scale.unsqueeze(-1),
                                    timed=timed, reps=reps)
    return out


def residual_rows(full, sparse, codes, scale, timed, reps: int) -> dict:
    """One layer's gpu-int8 refresh residual: the former PyTorch sequence (fp32 copy and subtraction, the cached
    D dequantised, the drift, abs / amax / divide / round / clamp / int8 copy) against the one-pass kernel."""
    import torch
    from quantsparse_kernels.residual import int8_residuals
    from quantsparse_kernels.residual_ref import int8_residuals_ref

    def torch_path():
        d = full.to(torch.float32, copy=True).sub_(sparse)
        d2 = (codes.float() * scale).neg_().add_(d)
        s = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        return torch.round(d / s).clamp(-127, 127).to(torch.int8), s, d2

    got, ref = int8_residuals(full, sparse, codes, scale), int8_residuals_ref(full, sparse, codes, scale)
    equal = all(torch.equal(a, b) for a, b in zip(got, ref))
    former = torch_path()  # the scale may differ from the reference's product by an ulp: codes by at most 1
    former_code_gap = int((former[0].int() - ref[0].int()).abs().max())
    del former
    del got, ref
    torch_ms = timed(torch_path, reps)
    kernel_ms = timed(lambda: int8_residuals(full, sparse, codes, scale), reps)
    print(f"  refresh residual (gpu-int8), one layer: PyTorch {torch_ms:.2f} ms, one-pass kernel {kernel_ms:.2f} ms "
          f"({torch_ms / kernel_ms:.1f}x), {'equal' if equal else 'NOT EQUAL'} to the reference (former path's codes "
          f"within {former_code_gap})", flush=True)
    return dict(torch_ms=torch_ms, kernel_ms=kernel_ms, speedup=torch_ms / kernel_ms, equal=equal,
                former_code_gap=former_code_gap)


def main(argv=None) -> int:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="720p", choices=sorted(GRIDS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", default=None, help="comma list of plain, spatial, temporal, single-v, single-v-copy, "
                                                 "text-mask, correction, product, product-copy (default all; plain "
                                                 "is always first: the ratios' base)")
    ap.add_argument("--out", default=str(ROOT / "out" / "sparse_conditions_bench.json"))
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and a.size != "small":
        sys.exit("no CUDA device: --size small runs the conditions under the interpreter (checks only)")
    print(f"{a.size}: {device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}", flush=True)
    only = None if a.rows is None else {"plain", *a.rows.split(",")}
    res = run(a.size, a.reps, device, only)
    print(f"cuDNN dense {res['dense_ms']:.1f} ms (single-block v view: {res['dense_single_v_ms']:.1f} ms); "
          f"density {res['density']:.3f}")
    write_result(res, "sparse_conditions_bench.py", argv, a.out, device)
    return 0


def write_result(res: dict, script: str, argv, out, device) -> None:
    """res with the command, time, torch and device, written as JSON to `out` (a temporary name, then renamed)."""
    import torch
    res.update(command=" ".join(["python3", f"benchmarks/{script}"] + list(sys.argv[1:] if argv is None else argv)),
               time_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())

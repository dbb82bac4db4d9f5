"""Is the SSAR refresh residual D = O_full - O_sparse still signal when attention is quantised? (issue 20)

    python benchmarks/residual_noise.py [--step 10] [--out FILE.json]

Runs the embedded tiny model (W4A8, the demo's cached calibration) once with the standard schedule at
15% and records every attention call of one refresh step (default step 10: the second refresh, the
first with a second-order term). For each recorded call it computes D exactly (float64 dense minus
float64 block-sparse attention of the same bf16 q/k/v under the same mask and text padding) and D as
each attention path rounds it, through the Triton kernels (CPU: Triton's interpreter, which emulates
the FP8 rounding by bits):
- model dtype: dense SDPA minus the sparse kernel in the model's own dtype (the default path; the tiny
  model runs in fp32 on the CPU, so this row is ~0 there);
- int8 dense passes (SparseSettings.int8_attention): the dense INT8 kernel minus the sparse kernel in the
  model's dtype;
- int8 / int8-fp8 (SparseSettings.attention_precision): both passes quantised alike, merged refresh.
- comfy kitchen int8 dense passes (CUDA, where comfy_kitchen's INT8 attention loads: the attention ComfyUI
  >= 0.33 runs with --use-ck-attention, which Sparse Sampler's dense_attention "comfyui" hands the dense
  passes to): that kernel (INT8 Q, K, V and P) minus the sparse kernel in the model's dtype.
It prints ||D_path - D_exact|| / ||D_exact|| per call (noise-to-signal; 1 would mean D is all noise)
and ||D_exact|| / ||O_full||, and writes them as JSON. With a CUDA GPU the model and kernels run there
(compiled Triton); without one, on the CPU under Triton's interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available():  # before any kernel module is imported: they pick the interpreter then
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from quantsparse_core import dispatch  # noqa: E402
from quantsparse_core.demo import DemoSettings, compressed_model  # noqa: E402
from quantsparse_core.models.tiny.embedded import generate  # noqa: E402
from quantsparse_core.models.tiny.evaluate import FIXED_SCENES  # noqa: E402
from quantsparse_core.results import _block_for  # noqa: E402
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention  # noqa: E402

PATHS = ("model dtype", "int8 dense passes", "int8", "int8-fp8")
KITCHEN = "comfy kitchen int8 dense passes"


def kitchen_int8_attention():
    """comfy_kitchen's INT8 attention where it runs here (int8_attention_bench's loader: its CUDA extension
    unpacked from .devcarry), else None."""
    if not torch.cuda.is_available():
        return None
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from int8_attention_bench import _kitchen_int8
    return _kitchen_int8()


class _Recorded(Exception):
    """Raised at the first call after the recorded step: the rest of the generation is not needed."""


class Recorder(SSARAttention):
    """SSARAttention that keeps the inputs of every refresh call made at one step."""

    def __call__(self, q, k, v, mask, call):
        if call.step is not None and call.step.index > self.step:
            raise _Recorded
        return super().__call__(q, k, v, mask, call)

    def __init__(self, settings, step: int):
        super().__init__(settings)
        self.step, self.calls = step, []

    def _refresh_outputs(self, q, k, v, mask, block_mask, call, key, second):
        if call.step is not None and call.step.index == self.step:
            self.calls.append((q.clone(), k.clone(), v.clone(), None if mask is None else mask.clone(), block_mask, call))
        return super()._refresh_outputs(q, k, v, mask, block_mask, call, key, second)


def residuals(q, k, v, mask, bm, call, kitchen=None) -> dict:
    """{path: D [B, L, H*D] fp64} and the exact D, O_full for one recorded call."""
    from quantsparse_kernels.refresh_attention import refresh_attention
    from quantsparse_kernels.sparse_attention import sparse_attention
    from quantsparse_kernels.sparse_attention_ref import dense_masked_attention_f64
    from quantsparse_core.models.attention import allowed_keys
    kw = dispatch._mask_arguments(q, mask, bm, call.txt_len, call.grid)
    index, count = dispatch._indices(bm.keep, bm, q.device)
    rest = dispatch._indices(~bm.keep, bm, q.device)
    block = kw.pop("block")
    full64 = dense_masked_attention_f64(q, k, v, torch.ones_like(bm.keep), block, **kw)
    d64 = full64 - dense_masked_attention_f64(q, k, v, bm.keep, block, **kw)
    b, heads, length, dim = q.shape
    sparse = sparse_attention(q, k, v, index, count, block=block, **kw).double()
    m = None if mask is None else mask.reshape(mask.shape[0], 1, 1, length).to(q.dtype)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(b, length, heads * dim)
    with dispatch.forced("triton"):
        int8_dense = dispatch.int8_dense_attention(q, k, v, keep=allowed_keys(mask) if mask is not None else None)
    out = {"model dtype": sdpa.double() - sparse, "int8 dense passes": int8_dense.double() - sparse}
    if kitchen is not None:
        o = kitchen(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=None if m is None else m.to(q.dtype))
        out[KITCHEN] = o.transpose(1, 2).reshape(b, length, heads * dim).double() - sparse
    for prec in ("int8", "int8-fp8"):
        out[prec] = refresh_attention(q, k, v, index, count, *rest, block=block, precision=prec, **kw)[1].double()
    return out, d64, full64


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", type=int, default=10, help="the refresh step to record (standard schedule: 5, 10, ...)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--density", type=float, default=0.15)
    ap.add_argument("--out", default=str(ROOT / "out" / "residual_noise.json"))
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cache, status = compressed_model(DemoSettings(device=device), print)
    settings = SparseSettings(density=a.density, block=_block_for(a.density), schedule="standard")
    rec = Recorder(settings, a.step)
    if settings.plan(a.steps).kind(a.step) != "refresh":
        raise SystemExit(f"step {a.step} is not a refresh step of the standard {a.steps}-step schedule")
    t0 = time.time()
    try:
        with model.attention(rec):
            generate(model, [FIXED_SCENES[0].prompt()], [0], steps=a.steps)
    except _Recorded:
        pass
    print(f"generated ({time.time() - t0:.0f} s); {len(rec.calls)} refresh calls recorded at step {a.step}", flush=True)
    rows, kitchen = [], kitchen_int8_attention()
    for q, k, v, mask, bm, call in rec.calls:
        paths, d64, full64 = residuals(q, k, v, mask, bm, call, kitchen)
        row = dict(block=f"{call.block_type} {call.block_index}", tokens=q.shape[2], heads=q.shape[1],
                   density=bm.density(), d_over_o=float(d64.norm() / full64.norm()))
        names = [n for n in (*PATHS, KITCHEN) if n in paths]
        for name in names:
            row[name] = float((paths[name].to(d64.device) - d64).norm() / d64.norm())
        rows.append(row)
        print(f"{row['block']:10s} |D|/|O| {row['d_over_o']:.3f}  noise/|D|: " +
              "  ".join(f"{n} {row[n]:.4f}" for n in names), flush=True)
    res = dict(run="SSAR refresh residual: quantisation noise", date=time.strftime("%Y-%m-%d"),
               command="python benchmarks/residual_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               model=f"embedded tiny HunyuanVideo, W4A8 ({status})", step=a.step, steps=a.steps, rows=rows,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               versions=dict(torch=torch.__version__))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

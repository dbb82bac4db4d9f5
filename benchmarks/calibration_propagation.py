"""Which inputs should feed block i+1 in streaming calibration: the FP block's outputs or the
calibrated (quantized) block's outputs? Measured on the embedded tiny model.

    python benchmarks/calibration_propagation.py [--samples 20] [--epochs 15] [--bits 4 8] [--method msad]

Both variants calibrate from the same captured block-0 inputs (same trajectories as capture_embedded),
write the compressed file, load it, and are scored like docs/RESULTS.md: velocity error (one model call
against the FP model on the FP model's own inputs) and PSNR/SSIM of the fixed prompt set's videos.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsparse_core.calib.block_source import module_source  # noqa: E402
from quantsparse_core.calib.calibrate import CalibSettings  # noqa: E402
from quantsparse_core.calib.stream_capture import capture_first_block  # noqa: E402
from quantsparse_core.calib.streaming import assemble, calibrate_streaming  # noqa: E402
from quantsparse_core.calib.tensor_store import TensorStore  # noqa: E402
from quantsparse_core.io.checkpoint import load_compressed  # noqa: E402
from quantsparse_core.metrics import psnr, ssim  # noqa: E402
from quantsparse_core.models.tiny.embedded import generate, load_embedded  # noqa: E402
from quantsparse_core.models.tiny.shapes import random_scenes  # noqa: E402
from quantsparse_core.results import record_calls, velocity_error, videos_of  # noqa: E402


def run(samples=20, epochs=15, bits=(4, 8), method="msad", steps=16, per_trajectory=4, seed=0, log=print) -> dict:
    model, _ = load_embedded()
    ref, calls = record_calls(model, steps)
    scenes = random_scenes(-(-samples // per_trajectory), torch.Generator().manual_seed(seed))

    def traj(j, on_step):
        generate(model, [scenes[j].prompt()], [seed * 1000 + j], steps=20, on_step=on_step)
    cap = capture_first_block(model, traj, samples, 20, per_trajectory, TensorStore())
    source = module_source(model)
    settings = CalibSettings(method=method, w_bits=bits[0], a_bits=bits[1], epochs=epochs)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prop in ("fp", "quant"):
            t0 = time.time()
            policy, report, parts = calibrate_streaming(source, cap, settings, propagation=prop)
            out = Path(tmp) / f"{prop}.safetensors"
            assemble(source, policy, settings, parts, out, {}, None)
            qm, _ = load_compressed(out)
            vids = videos_of(qm, steps)
            rows[prop] = {"velocity_error": velocity_error(qm, model, calls), "psnr": psnr(vids, ref),
                          "ssim": ssim(vids, ref),
                          "block_mse": sum(r["quant"] for r in report.values()) / len(report),
                          "seconds": time.time() - t0}
            log(f"{prop:>5}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[prop].items()))
    return {"samples": samples, "epochs": epochs, "bits": list(bits), "method": method, "steps": steps, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--bits", type=int, nargs=2, default=(4, 8))
    ap.add_argument("--method", default="msad")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = run(a.samples, a.epochs, tuple(a.bits), a.method)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

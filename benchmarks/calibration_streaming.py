"""Streaming calibration of the HunyuanVideo-13B architecture (random weights) under a GPU memory cap.

    python benchmarks/calibration_streaming.py --cap-gb 24 --latent 848x480x73 --samples 20 --epochs 15 \
        --blocks 3 --out benchmarks/results/calibration_streaming_h200.json
    python benchmarks/calibration_streaming.py --preset test          # tiny, on the CPU, seconds

Measures (1) the capture: full-model forwards along sampling trajectories with one block on the GPU at a
time, block-0 inputs kept on disk; all of them, or, when they would not fit the time budget, as many as
fit, and the rest projected from the measured per-forward time (said in the output); (2) >= 3 consecutive
blocks calibrated in full (MSAD, bf16 autocast) starting at --first-block (default: the last double block,
so a double and two single blocks), after propagating FP outputs through the blocks before it.
Projects the whole job from the measured per-block times, records peak GPU memory
(torch.cuda.max_memory_allocated) and peak host RSS, and writes JSON with a `targets` list.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsparse_core.calib.block_source import BlockSource  # noqa: E402
from quantsparse_core.calib.calibrate import CalibSettings  # noqa: E402
from quantsparse_core.calib.capture import n_trajectories  # noqa: E402
from quantsparse_core.calib.pipeline import SAMPLES_PER_TRAJECTORY, Conditioning  # noqa: E402
from quantsparse_core.calib.stream_budget import block_params, estimate  # noqa: E402
from quantsparse_core.calib.stream_capture import capture_first_block, streamed_dit, trajectory_runner  # noqa: E402
from quantsparse_core.calib.streaming import calibrate_streaming  # noqa: E402
from quantsparse_core.calib.tensor_store import TensorStore  # noqa: E402
from quantsparse_core.models.config import get_preset  # noqa: E402

H200_BF16_PEAK = 989e12          # dense bf16 tensor FLOP/s (NVIDIA H200 SXM datasheet)
CONSUMER_24GB_BF16_PEAK = 165e12  # RTX 4090, bf16 with fp32 accumulate (Ada whitepaper), dense


class RandomSource(BlockSource):
    """Random weights of any config, made per block on request from a seed, so nothing holds the whole
    model: the host-memory figure is the calibration's own, as with SafetensorsSource reading a file block
    by block. (Run from ComfyUI, the weights live in ComfyUI's MODEL, which the user's ComfyUI holds anyway;
    the JSON states their size separately.) Blocks are made directly on the device they are wanted on: the
    copy a held model would need is measured separately (`h2d_seconds_per_forward`)."""

    def __init__(self, config, seed=0, dtype=torch.bfloat16):
        self.config = config
        super().__init__()
        self.seed, self.dtype_ = seed, dtype
        self.salt = {blk: i + 1 for i, blk in enumerate(self.names())}

    def _make(self, metas: dict, salt: int, device, dtype) -> dict:
        g = torch.Generator(device).manual_seed(self.seed * 1000003 + salt)
        out = {}
        for k, m in metas.items():
            if k.endswith("bias"):
                t = torch.zeros(m.shape, device=device)
            elif m.ndim == 1:
                t = torch.ones(m.shape, device=device)
            else:
                t = torch.randn(m.shape, generator=g, device=device) / m[0].numel() ** 0.5
            out[k] = t.to(dtype)
        return out

    def tensors_on(self, kind, idx, device, dtype=None):
        return self._make(self.skeleton_block(kind, idx).state_dict(), self.salt[(kind, idx)], device, dtype or self.dtype_)

    def tensors(self, kind, idx):
        return self.tensors_on(kind, idx, "cpu")

    def other_tensors(self):
        sk = {k: v for k, v in self.skeleton.state_dict().items() if not k.startswith(("double_blocks.", "single_blocks."))}
        return self._make(sk, 0, "cpu", self.dtype_)

    def weights_bytes(self) -> int:
        """What the whole model would take in `dtype` (held by ComfyUI when run from the node)."""
        size = torch.empty((), dtype=self.dtype_).element_size()
        return sum(v.numel() for v in self.skeleton.state_dict().values()) * size

    def fingerprint(self):
        return f"random-{self.seed}"


def parse_latent(text: str, config) -> tuple:
    """'WxHxF' pixels -> latent [C, T, H, W] (HunyuanVideo VAE: 8x spatial, 4x temporal, T = (F-1)/4+1)."""
    w, h, f = (int(x) for x in text.lower().split("x"))
    if (f - 1) % 4 or h % 16 or w % 16:
        raise ValueError(f"latent size {text}: frames must be 4k+1 and width/height multiples of 16")
    return (config.in_channels, (f - 1) // 4 + 1, h // 8, w // 8)


def h2d_seconds_per_forward(source, dev) -> tuple:
    """Measured pinned host->GPU copy time of one block of each kind, x the blocks of one model call: what
    streaming a model held on the host (ComfyUI's offloaded MODEL) adds to each capture call."""
    secs = {}
    for kind in ("double", "single"):
        nbytes = sum(v.numel() for v in source.skeleton_block(kind, 0).state_dict().values()) * \
            torch.empty((), dtype=source.dtype_).element_size()
        host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        host.random_(0, 255)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst.copy_(host)
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(3):
            dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize(dev)
        secs[kind] = (time.perf_counter() - t) / 3
        del host, dst
    cfg = source.config
    return secs["double"] * cfg.depth_double + secs["single"] * cfg.depth_single, secs


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(a, log=print) -> dict:
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and dev.index is None:  # set_per_process_memory_fraction and the peak counters need an index
        dev = torch.device("cuda", torch.cuda.current_device())
    config = get_preset(a.preset)
    latent = parse_latent(a.latent, config)
    if cuda:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.cap_gb * 2**30 / total), dev)
    wdtype = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are slow; the test preset is tiny
    source = RandomSource(config, seed=0, dtype=wdtype)
    log(f"random {a.preset} weights ({wdtype}, made per block on request; whole model {source.weights_bytes() / 2**30:.1f} GB)")
    settings = CalibSettings(method="msad", epochs=a.epochs)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(torch.randn(1, a.txt_len, config.context_in_dim, generator=g),
                        torch.randn(1, 768, generator=g), torch.ones(1, a.txt_len), 6.0)
    est = estimate(config, latent, a.txt_len, a.samples, a.steps, settings, torch.bfloat16)
    n_traj = n_trajectories(a.samples, SAMPLES_PER_TRAJECTORY)
    forwards_full = n_traj * a.steps
    work = Path(tempfile.mkdtemp(prefix="qs-calib-", dir=a.workdir))

    # (1) capture
    model = streamed_dit(source, dev)
    done = {"forwards": 0, "t": []}
    budget = a.capture_budget_s

    class Enough(Exception):
        pass

    def on_step(j, n, step):
        if cuda:
            torch.cuda.synchronize(dev)
        done["t"].append(time.perf_counter())
        if done["t"][-1] - t_cap > budget and len(done["t"]) >= 3:
            raise Enough
    run = trajectory_runner(model, cond, latent, a.steps, 0, n_traj, on_step)
    store = TensorStore(work / "capture.bin")
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t_cap = time.perf_counter()
    try:
        cap = capture_first_block(model, run, a.samples, a.steps, SAMPLES_PER_TRAJECTORY, store, wdtype)
        full = True
    except Enough:
        full = False
        cap = None
    stamps = done["t"]
    forwards = len(stamps) - (0 if full else 1)       # the last stamp starts a forward that was not run
    cap_seconds = (stamps[-1] if not full else time.perf_counter()) - t_cap
    per_forward = cap_seconds / max(1, forwards)
    cap_projected = cap_seconds if full else per_forward * forwards_full
    h2d_forward, h2d_block = h2d_seconds_per_forward(source, dev) if cuda else (0.0, {})
    cap_projected += h2d_forward * forwards_full  # weights made on the GPU here; a held model is copied
    gpu_cap = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    log(f"capture: {forwards}/{forwards_full} model calls measured in {cap_seconds:.0f} s "
        f"({per_forward:.2f} s each){'' if full else f', full capture projected {cap_projected:.0f} s'}")
    if not full:  # keep what was captured; the calibration timing does not depend on the values
        from quantsparse_core.calib.stream_capture import Capture
        meta = []
        cap = Capture(store, [], meta)
        model2 = model

        def one(j, cb):  # one more forward at the first captured step to get a single sample
            cb(type("S", (), {"index": 0})())
            with torch.no_grad():
                x = torch.randn(1, *latent, device=dev, dtype=wdtype)
                model2(x, torch.full((1,), 1000.0, device=dev, dtype=wdtype), cond.context.to(dev, wdtype),
                       cond.pooled.to(dev, wdtype), guidance=torch.full((1,), 6.0, device=dev),
                       attention_mask=cond.mask.to(dev))
        store = TensorStore(work / "capture1.bin")
        one_cap = capture_first_block(model, one, 1, 1, 1, store, wdtype)
        for _ in range(a.samples - 1):
            store.append(store.get(0))
            one_cap.meta.append(dict(one_cap.meta[0]))
        cap = one_cap
    del model
    if cuda:
        torch.cuda.empty_cache()

    # (2) calibrate consecutive blocks
    names = source.names()
    first = a.first_block if a.first_block >= 0 else max(0, config.depth_double - 1)
    first = min(first, len(names) - a.blocks)
    times, phases = {}, {}

    def on_block(name, sec, phase):
        times[name], phases[name] = sec, phase
        log(f"  {name}: {phase} in {sec:.1f} s (peak GPU {torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0:.1f} GB, "
            f"host {host_peak_gb():.1f} GB)")

    def progress(bi, n, epoch, loss):
        pass
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    stats, oom = {}, None
    t_cal = time.perf_counter()
    try:
        calibrate_streaming(source, cap, settings, device=dev, workdir=work / "parts", amp=cuda,
                            store_dtype=wdtype, host_budget=int(a.host_budget_gb * 2**30),
                            progress=progress, max_blocks=a.blocks, first_block=first, on_block=on_block, stats=stats)
    except torch.cuda.OutOfMemoryError as e:  # recorded, not hidden
        oom = str(e).splitlines()[0]
        log(f"OUT OF MEMORY: {oom}")
    gpu_cal = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    calibrated = {n: t for n, t in times.items() if phases[n] == "calibrated"}
    propagated = {n: t for n, t in times.items() if phases[n] != "calibrated"}
    p = block_params(config)
    per_kind = {}
    for kind in ("double", "single"):
        got = [t for n, t in calibrated.items() if n.startswith(kind)]
        per_kind[kind] = sum(got) / len(got) if got else None
    for kind, other in (("double", "single"), ("single", "double")):  # unmeasured kind: scaled by FLOPs
        if per_kind[kind] is None and per_kind[other] is not None:
            f = {k: 2 * est["tokens"] * (p[k] - p[k + "_mod"]) + 4 * est["tokens"] ** 2 * config.hidden_size
                 for k in ("double", "single")}
            per_kind[kind] = per_kind[other] * f[kind] / f[other]
    calib_total = (config.depth_double * per_kind["double"] + config.depth_single * per_kind["single"]
                   if per_kind["double"] is not None else float("nan"))
    total_h = (cap_projected + calib_total) / 3600
    flops = est["calib_flops"] + est["capture_flops"]
    achieved = flops / (total_h * 3600) if total_h == total_h and total_h > 0 else float("nan")
    consumer_h = total_h * H200_BF16_PEAK / CONSUMER_24GB_BF16_PEAK
    peak_gpu = max(gpu_cap, gpu_cal)
    res = {
        "preset": a.preset, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "cap_gb": a.cap_gb,
        "latent_pixels": a.latent, "latent": list(latent), "tokens": est["tokens"], "samples": a.samples,
        "epochs": a.epochs, "steps": a.steps, "method": "msad", "amp_bf16": cuda,
        "capture": {"forwards_measured": forwards, "forwards_full": forwards_full, "measured_s": cap_seconds,
                    "per_forward_s": per_forward, "projected_full_s": cap_projected, "measured_in_full": full,
                    "peak_gpu_gb": gpu_cap, "h2d_weights_s_per_forward": h2d_forward, "h2d_s_per_block": h2d_block,
                    "how": "measured calls x all calls, plus the measured pinned host->GPU copy of every block per "
                           "call (this run makes the weights on the GPU; a held model would be copied)"},
        "blocks": {n: {"seconds": t, "phase": phases[n]} for n, t in times.items()},
        "per_block_s": per_kind, "propagation_s": sum(propagated.values()), "calibration_wall_s": time.perf_counter() - t_cal,
        "projected": {"capture_s": cap_projected, "calibration_s": calib_total, "total_h": total_h,
                      "achieved_flops": achieved, "h200_peak_share": achieved / H200_BF16_PEAK,
                      "consumer_24gb_h": consumer_h,
                      "how": "capture: measured per model call x all calls; calibration: mean measured seconds per "
                             "calibrated block of each kind x 20 double + 40 single (a kind not measured scaled by "
                             "FLOPs); 24 GB card: same share of its bf16 peak (RTX 4090, 165 TFLOP/s)"},
        "peak_gpu_gb": peak_gpu, "peak_host_gb": host_peak_gb(),
        "model_weights_gb": source.weights_bytes() / 2**30,
        "weights_source": "made per block on request (as a safetensors file read block by block); "
                          "the whole model is never held by this process",
        "spilled_to_disk_gb": stats.get("spilled_bytes", 0) / 2**30 + (store.size / 2**30),
        "estimate": {k: v for k, v in est.items() if isinstance(v, (int, float))}, "oom": oom,
    }
    res["targets"] = [
        {"name": "peak GPU memory (GB)", "measured": round(peak_gpu, 2), "target": 22, "met": peak_gpu <= 22 and not oom},
        {"name": "peak host memory (GB)", "measured": round(res["peak_host_gb"], 2), "target": 48,
         "met": res["peak_host_gb"] <= 48},
        {"name": "projected calibration time on one H200 (h)", "measured": round(total_h, 3), "target": 2,
         "met": bool(total_h <= 2) and not oom},
    ]
    return res


def table(res: dict) -> str:
    rows = [("tokens", f"{res['tokens']:,}"),
            ("capture", f"{res['capture']['forwards_measured']}/{res['capture']['forwards_full']} calls measured, "
                        f"{res['capture']['per_forward_s']:.2f} s each -> {res['capture']['projected_full_s'] / 60:.1f} min"
                        + ("" if res["capture"]["measured_in_full"] else " (projected)")),
            ("per calibrated block", ", ".join(f"{k} {v:.0f} s" for k, v in res["per_block_s"].items() if v)),
            ("projected total", f"{res['projected']['total_h']:.2f} h on this GPU; "
                                f"{res['projected']['consumer_24gb_h']:.1f} h on a 24 GB RTX 4090 (FLOP share)"),
            ("peak GPU / host", f"{res['peak_gpu_gb']:.1f} GB / {res['peak_host_gb']:.1f} GB "
                                f"(whole model never held: {res['model_weights_gb']:.1f} GB read per block; to disk {res['spilled_to_disk_gb']:.1f} GB)")]
    rows += [(t["name"], f"{t['measured']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}") for t in res["targets"]]
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="hunyuan-video-13b")
    ap.add_argument("--cap-gb", type=float, default=24)
    ap.add_argument("--latent", default="848x480x73", help="pixels WxHxFRAMES (the shipped calibrate workflow)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps of the capture trajectories")
    ap.add_argument("--blocks", type=int, default=3, help="consecutive blocks calibrated in full")
    ap.add_argument("--first-block", type=int, default=-1, help="default: the last double block")
    ap.add_argument("--txt-len", type=int, default=256)
    ap.add_argument("--capture-budget-s", type=float, default=90,
                    help="measure capture calls for this long, project the rest (inf: measure all)")
    ap.add_argument("--host-budget-gb", type=float, default=12, help="one block's data beyond this go to disk")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/calibration_streaming.json")
    a = ap.parse_args(argv)
    if a.preset == "test" and a.latent == "848x480x73":
        a.latent = "32x32x1"
    res = measure(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out)
    print(table(res))
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()

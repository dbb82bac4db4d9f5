"""Before a streaming calibration starts: how much GPU memory, host memory, disk and time it needs,
and a clear refusal when it cannot fit.

The GPU figure is the largest block's weights (FP copy, float32 quantized copy, one fake-quantized
weight) plus its training activations, which grow linearly with the tokens; the activation factor
per token and the throughput are measured (benchmarks/calibration_streaming.py, docs/CALIBRATION.md).
"""
from __future__ import annotations

import math

import torch

from .capture import n_trajectories
from .pipeline import SAMPLES_PER_TRAJECTORY

# Training activations of one block per token, in units of hidden_size bytes (bf16 autocast, the
# single block's fake-quantized linear1/linear2 path dominates). Measured: docs/CALIBRATION.md.
ACT_BYTES_PER_TOKEN_PER_HIDDEN = 200
# Effective training throughput (FLOP/s) assumed when none is given: bf16 autocast, eager fake quant.
DEFAULT_RATE = {"h200": 300e12, "24gb": 100e12}


def _grid(config, latent_shape):
    _, t, h, w = latent_shape[-4:]
    p = config.patch_size
    return t // p[0], h // p[1], w // p[2]


def block_params(config) -> dict:
    c, m = config.hidden_size, config.mlp_hidden
    double = 2 * (3 * c * c + c * c + 2 * c * m + 6 * c * c)   # qkv, proj, mlp, modulation, per stream
    single = c * (3 * c + m) + (c + m) * c + 3 * c * c
    return {"double": double, "single": single,
            "double_mod": 2 * 6 * c * c, "single_mod": 3 * c * c}


def estimate(config, latent_shape, txt_len: int, n_samples: int, steps: int, settings, store_dtype=torch.bfloat16,
             propagation: str = "fp", per_trajectory: int = SAMPLES_PER_TRAJECTORY, rate: float | None = None) -> dict:
    """Resource estimate of one calibration job (bytes, FLOPs, seconds at `rate` FLOP/s)."""
    t, h, w = _grid(config, latent_shape)
    tokens = txt_len + t * h * w
    c, heads = config.hidden_size, config.num_heads
    sb = torch.empty((), dtype=store_dtype).element_size()
    one_set = n_samples * tokens * c * sb
    k = min(settings.top_k, tokens)
    msad = 0
    if settings.trained and (settings.uses_global or settings.uses_local):
        pooled = math.ceil(tokens / settings.stride)
        msad = n_samples * heads * ((k * tokens if settings.uses_local else 0) + pooled * pooled) * sb
    per_block_host = one_set * (2 if propagation == "fp" else 3) + msad
    rope = tokens * (c // heads) * 2 * 4
    capture = one_set + rope + n_samples * 4 * c * 2
    p = block_params(config)
    big = max(p["double"], p["single"])
    weights = big * (2 + 4 + 4)               # FP bf16 copy + float32 quantized copy + fake-quantized weight
    act = tokens * c * ACT_BYTES_PER_TOKEN_PER_HIDDEN
    msad_gpu = 4 * heads * k * tokens * 4 if settings.uses_local else 0
    gpu = weights + act + msad_gpu
    lin = {kind: p[kind] - p[kind + "_mod"] for kind in ("double", "single")}
    attn = 4 * tokens * tokens * c
    fwd = {kind: 2 * tokens * lin[kind] + attn for kind in lin}
    n_double, n_single = config.depth_double, config.depth_single
    steps_per_block = settings.epochs * n_samples if settings.trained else 0
    calib_flops = sum(n * (3 * steps_per_block + 2 * n_samples) * fwd[kind]
                      for kind, n in (("double", n_double), ("single", n_single)))
    model_fwd = n_double * fwd["double"] + n_single * fwd["single"]
    capture_flops = n_trajectories(n_samples, per_trajectory) * steps * model_fwd
    rate = rate or DEFAULT_RATE["h200"]
    return {"tokens": tokens, "gpu_bytes": gpu, "host_capture_bytes": capture, "host_block_bytes": per_block_host,
            "host_bytes": capture + per_block_host, "calib_flops": calib_flops, "capture_flops": capture_flops,
            "seconds": (calib_flops + capture_flops) / rate, "rate": rate,
            "capture_forwards": n_trajectories(n_samples, per_trajectory) * steps}


def describe(est: dict) -> str:
    g = 2 ** 30
    return (f"calibration at {est['tokens']:,} tokens: about {est['gpu_bytes'] / g:.1f} GB GPU memory, "
            f"{est['host_bytes'] / g:.1f} GB host memory (capture {est['host_capture_bytes'] / g:.1f} GB, kept on "
            f"disk in the partial folder; one block's data {est['host_block_bytes'] / g:.1f} GB), "
            f"{est['capture_forwards']} model calls to capture, about {est['seconds'] / 3600:.1f} h at "
            f"{est['rate'] / 1e12:.0f} TFLOP/s")


def check_fits(est: dict, gpu_budget: int | None, disk_free: int | None = None) -> None:
    """MemoryError naming what does not fit and what to change; nothing happens when it fits."""
    g = 2 ** 30
    if gpu_budget is not None and est["gpu_bytes"] > gpu_budget:
        raise MemoryError(f"calibrating one block at {est['tokens']:,} tokens needs about {est['gpu_bytes'] / g:.1f} GB "
                          f"of GPU memory but {gpu_budget / g:.1f} GB are free: use a smaller calibration latent "
                          "(fewer frames or a lower resolution; docs/CALIBRATION.md), close other programs, "
                          "or use a larger GPU")
    # the capture always goes to disk; one block's data go there too when host memory is short
    if disk_free is not None and est["host_bytes"] > disk_free:
        raise MemoryError(f"the captured inputs and one block's data need up to {est['host_bytes'] / g:.1f} GB of disk "
                          f"beside the output but {disk_free / g:.1f} GB are free: free disk space, use fewer samples "
                          "or a smaller calibration latent")

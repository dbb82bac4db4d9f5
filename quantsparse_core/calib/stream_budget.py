"""Before a streaming calibration starts: how much GPU memory, host memory, disk and time it needs,
and a clear refusal when it cannot fit.

The GPU figure is the measured model of one training step (benchmarks/calibration_memory.py, on the
CPU with CUDA autocast's dtypes, 13B widths, scaled; docs/CALIBRATION.md "First H200 runs"): a part
per block parameter (FP bf16 copy, the quantized copy's frozen weights held in bf16 while training,
the fake-quantized bf16 weights saved for backward and the weight-side temporaries) plus a part
linear in the tokens (activations saved for backward, per hidden unit, and MSAD's local map, per
head x salient token), times an allocator margin, plus the prefetch rings (prefetch.py: up to DEPTH
samples' inputs, targets and MSAD maps in the store dtype, page-locked on the host and on the GPU).
Measured at a 24 GB cap (docs/CALIBRATION.md): 13.5 GB peak against 14.7 GB estimated before the
rings were added (H200, 2026-12-05); 16.45 GB allocated with the rings (H100, 2026-12-06), which the
margin below covers.

Wan (a WanConfig) uses the same per-parameter and per-token constants (measured on HunyuanVideo's
double block, not yet on a Wan block): its tokens are the video tokens (self-attention sees no text),
its cross-attention's text / CLIP keys and values are counted in parameters and FLOPs, and the capture
also holds each sample's time projection and embedded text / image tokens.
"""
from __future__ import annotations

import math

import torch

from ..models.family import WAN, family_of
from .capture import WAN_KIND, n_trajectories
from .pipeline import SAMPLES_PER_TRAJECTORY
from .prefetch import DEPTH as PREFETCH_DEPTH

# One training step of a 13B double block under bf16 autocast, measured on the CPU (calibration_memory.py,
# 1,024 and 2,048 tokens, scaled): persistent 1.27 GB + 2.38 GB per step independent of the tokens for
# 339.7 M parameters (11.5 B each), and 319 KiB per token of which 48 KiB is the MSAD local map
# (8 B per head x salient token: its fp32 softmax and fp32 target, kept by the MSE) and ~90 B per
# hidden unit the rest (rounded up to 96). The single block is below both.
GPU_BYTES_PER_PARAM = 11.5
ACT_BYTES_PER_TOKEN_PER_HIDDEN = 96
LOCAL_MAP_BYTES = 8          # per head x salient token x token
# Caching-allocator fragmentation and kernels' workspaces: the 2026-12-06 H100 run (848x480x73, 20 samples,
# MSAD) peaked at 1.123 x the parts below + the rings; 1.15 keeps the estimate above it.
ALLOCATOR_MARGIN = 1.15
# Effective training throughput (FLOP/s) assumed when none is given: bf16 autocast, eager fake quant.
# Measured on an H100 at the 13B shape (2026-12-06): 198 TFLOP/s, 20% of the bf16 peak; a 24 GB RTX 4090
# at the same share of its 165 TFLOP/s.
DEFAULT_RATE = {"h200": 200e12, "24gb": 33e12}


def _grid(config, latent_shape):
    _, t, h, w = latent_shape[-4:]
    p = config.patch_size
    return t // p[0], h // p[1], w // p[2]


WAN_IMAGE_TOKENS = 257  # CLIP ViT-H tokens of a Wan 2.1 I2V image


def wan_block_params(config) -> int:
    """Parameters of one Wan block: self-attention, cross-attention (+ CLIP image K/V on I2V), FFN, modulation."""
    c, f = config.dim, config.ffn_dim
    return 4 * c * c + (6 if config.model_type == "i2v" else 4) * c * c + 2 * c * f + 6 * c


def _wan_kinds(config, tokens: int, txt_len: int) -> dict:
    """{"wan": (blocks, parameters, forward FLOPs of one block call)} for `tokens` video tokens."""
    c, f = config.dim, config.ffn_dim
    img = WAN_IMAGE_TOKENS if config.model_type == "i2v" else 0
    kv = 2 * txt_len * 2 * c * c + 2 * img * 2 * c * c          # cross-attention K/V on text and image tokens
    fwd = 2 * tokens * (6 * c * c + 2 * c * f) + kv + 4 * tokens * tokens * c + 4 * tokens * (txt_len + img) * c
    return {WAN_KIND: (config.num_layers, wan_block_params(config), fwd)}


def block_params(config) -> dict:
    c, m = config.hidden_size, config.mlp_hidden
    double = 2 * (3 * c * c + c * c + 2 * c * m + 6 * c * c)   # qkv, proj, mlp, modulation, per stream
    single = c * (3 * c + m) + (c + m) * c + 3 * c * c
    return {"double": double, "single": single,
            "double_mod": 2 * 6 * c * c, "single_mod": 3 * c * c}


def estimate(config, latent_shape, txt_len: int, n_samples: int, steps: int, settings, store_dtype=torch.bfloat16,
             propagation: str = "fp", per_trajectory: int = SAMPLES_PER_TRAJECTORY, rate: float | None = None) -> dict:
    """Resource estimate of one calibration job (bytes, FLOPs, seconds at `rate` FLOP/s). config: a
    HunyuanVideo DiTConfig or a WanConfig; txt_len: the text tokens of the prompt."""
    t, h, w = _grid(config, latent_shape)
    wan = family_of(config) is WAN
    tokens = t * h * w if wan else txt_len + t * h * w   # the tokens of the blocks' hidden state and self-attention
    c, heads = (config.dim if wan else config.hidden_size), config.num_heads
    sb = torch.empty((), dtype=store_dtype).element_size()
    one_set = n_samples * tokens * c * sb
    k = min(settings.top_k, tokens)
    msad = 0
    if settings.trained and (settings.uses_global or settings.uses_local):
        pooled = math.ceil(tokens / settings.stride)
        msad = n_samples * heads * ((k * tokens if settings.uses_local else 0) + pooled * pooled) * sb
    per_block_host = one_set * (2 if propagation == "fp" else 3) + msad
    # what one training step reads: inputs, targets and MSAD maps of one sample; the prefetch rings hold
    # up to PREFETCH_DEPTH of them (host: only what comes from disk needs it; counted in full)
    ring = PREFETCH_DEPTH * (2 * one_set + msad) // n_samples
    rope = tokens * (c // heads) * 2 * 4
    if wan:   # per sample: time projection (6 x dim), embedded text and CLIP tokens, in the model's bf16
        img = WAN_IMAGE_TOKENS if config.model_type == "i2v" else 0
        capture = one_set + rope + n_samples * (6 + txt_len + img) * c * 2
        kinds = _wan_kinds(config, tokens, txt_len)
    else:
        capture = one_set + rope + n_samples * 4 * c * 2
        p = block_params(config)
        attn = 4 * tokens * tokens * c
        kinds = {kind: (n, p[kind], 2 * tokens * (p[kind] - p[kind + "_mod"]) + attn)
                 for kind, n in (("double", config.depth_double), ("single", config.depth_single))}
    big = max(params for _, params, _ in kinds.values())
    weights = big * GPU_BYTES_PER_PARAM       # FP bf16 + quantized copy (bf16 while training) + step's weight side
    act = tokens * c * ACT_BYTES_PER_TOKEN_PER_HIDDEN
    msad_gpu = LOCAL_MAP_BYTES * heads * k * tokens if settings.uses_local else 0
    gpu = int((weights + act + msad_gpu) * ALLOCATOR_MARGIN) + ring
    steps_per_block = settings.epochs * n_samples if settings.trained else 0
    calib_flops = sum(n * (3 * steps_per_block + 2 * n_samples) * fwd for n, _, fwd in kinds.values())
    model_fwd = sum(n * fwd for n, _, fwd in kinds.values())
    capture_flops = n_trajectories(n_samples, per_trajectory) * steps * model_fwd
    rate = rate or DEFAULT_RATE["h200"]
    return {"tokens": tokens, "gpu_bytes": gpu, "host_capture_bytes": capture, "host_block_bytes": per_block_host,
            "host_ring_bytes": ring, "host_bytes": capture + per_block_host + ring,
            "calib_flops": calib_flops, "capture_flops": capture_flops,
            "seconds": (calib_flops + capture_flops) / rate, "rate": rate,
            "capture_forwards": n_trajectories(n_samples, per_trajectory) * steps}


def describe(est: dict) -> str:
    g = 2 ** 30
    return (f"calibration at {est['tokens']:,} tokens: about {est['gpu_bytes'] / g:.1f} GB GPU memory, "
            f"{est['host_bytes'] / g:.1f} GB host memory (capture {est['host_capture_bytes'] / g:.1f} GB, kept on "
            f"disk in the partial folder; one block's data {est['host_block_bytes'] / g:.1f} GB; read-ahead "
            f"buffers {est['host_ring_bytes'] / g:.1f} GB), "
            f"{est['capture_forwards']} model calls to capture, about {est['seconds'] / 3600:.1f} h at "
            f"{est['rate'] / 1e12:.0f} TFLOP/s")


def check_fits(est: dict, gpu_budget: int | None, disk_free: int | None = None, output_bytes: int = 0,
               on_disk: int = 0) -> None:
    """MemoryError naming what does not fit and what to change; nothing happens when it fits.
    output_bytes: the compressed file's size (its per-block parts and the file itself both go to disk);
    on_disk: bytes the job's partial folder already holds (a resumed job: its capture is written)."""
    g = 2 ** 30
    if gpu_budget is not None and est["gpu_bytes"] > gpu_budget:
        raise MemoryError(f"calibrating one block at {est['tokens']:,} tokens needs about {est['gpu_bytes'] / g:.1f} GB "
                          f"of GPU memory but {gpu_budget / g:.1f} GB are free: use a smaller calibration latent "
                          "(fewer frames or a lower resolution; docs/CALIBRATION.md), close other programs, "
                          "or use a larger GPU")
    # the capture always goes to disk; one block's data go there too when host memory is short; then the
    # packed per-block parts and the output file
    disk = est["host_capture_bytes"] + est["host_block_bytes"] + 2 * output_bytes  # read-ahead buffers stay in RAM
    if disk_free is not None and disk - on_disk > disk_free:
        held = f" ({on_disk / g:.1f} GB of it already in the job's partial folder)" if on_disk else ""
        raise MemoryError(f"the captured inputs, one block's data, the compressed parts and the output file need up to "
                          f"{disk / g:.1f} GB of disk beside the output{held} but {disk_free / g:.1f} GB are free: "
                          "free disk space (not the partial folder: it holds the resume), use fewer samples or a "
                          "smaller calibration latent")

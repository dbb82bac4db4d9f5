"""`./run demo`: what QuantSparse is for, in about a minute on a CPU.

The embedded tiny HunyuanVideo-architecture DiT generates one prompt and seed twice: dense, and
compressed (W4A8 weights calibrated with MSAD, loaded back from the compressed checkpoint format)
running SVG sparse attention with the SSAR residual cache. The caller gets a DemoResult: fidelity of
the compressed video against the dense one, storage, attention density actually used, time per
denoising step, and the side-by-side outputs written to the output folder.

The calibration is cached under <out>/cache/, keyed by the weights file and the calibration
settings, so only the first run pays for it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import safe_open

from .calib.calibrate import CalibSettings, calibrate
from .calib.capture import capture_embedded
from .io import FORMAT_VERSION, load_compressed, save_compressed
from .metrics import psnr, ssim
from .models.tiny.embedded import WEIGHTS, generate, load_embedded
from .models.tiny.prompts import PromptEncoder
from .models.tiny.shapes import analyse
from .png import strip, to_uint8, write_apng, write_png
from .quant.policy import default_policy
from .sparse.ssar import SparseSettings, SSARAttention

SIDE_BY_SIDE = "demo_side_by_side.png"
STRIP = "demo_strip.png"
GAP = 4  # pixels of grey between the dense and the QuantSparse picture


@dataclass
class DemoSettings:
    """What one demo run does. The calibration fields (calib_*) also key the cache."""
    prompt: str = "a red circle moving right slowly on a black background"
    seed: int = 0
    steps: int = 20
    guidance: float = 6.0
    density: float = 0.25          # what the tiny ComfyUI workflow uses (README)
    device: str = "cpu"
    out: Path = Path("out/demo")
    recalibrate: bool = False
    calib_method: str = "msad"
    calib_samples: int = 8         # the tiny workflow's calibration: 8 samples, 5 epochs
    calib_epochs: int = 5
    calib_steps: int = 20          # length of the trajectories the samples are taken from

    def __post_init__(self):
        self.out = Path(self.out)

    def calib_settings(self) -> CalibSettings:
        return CalibSettings(method=self.calib_method, w_bits=4, a_bits=8, epochs=self.calib_epochs)

    def sparse_settings(self) -> SparseSettings:
        return SparseSettings(density=self.density)


@dataclass
class RunStats:
    """One generation: its video [3, F, H, W], seconds per denoising step and in all, what the analyser reads."""
    video: torch.Tensor
    step_seconds: float
    seconds: float
    found: dict


@dataclass
class DemoResult:
    settings: DemoSettings
    dense: RunStats
    compressed: RunStats
    psnr: float
    ssim: float
    dense_bytes: int              # the DiT's state dict in bf16
    compressed_bytes: int         # the tensors of the compressed checkpoint
    linears_bytes: tuple          # (bf16, compressed) bytes of the quantized linears alone
    mask_density: float           # mean kept fraction of the sparse steps' block masks
    effective_density: float      # attention cost relative to dense over the run (SSARAttention)
    cache: Path
    cache_status: str             # "cached" or "calibrated in N s"
    outputs: list = field(default_factory=list)

    @property
    def storage_ratio(self) -> float:
        return self.dense_bytes / self.compressed_bytes


# -- the calibration cache ----------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """Identifies the weights by content, so re-trained weights get a new cache entry."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(s: DemoSettings, weights: Path = WEIGHTS) -> str:
    """Same weights + same calibration settings + same checkpoint format = the same cache file."""
    data = {"weights": file_sha256(weights), "calib": asdict(s.calib_settings()), "samples": s.calib_samples,
            "steps": s.calib_steps, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(s: DemoSettings, key: str) -> Path:
    return Path(s.out) / "cache" / f"tiny_w4a8_{s.calib_method}_{key}.safetensors"


def load_cached(path: Path, key: str, device, log: Callable) -> Optional[torch.nn.Module]:
    """The cached compressed model, or None (and a message) when it is missing, damaged or foreign:
    a bad cache file costs one recalibration, never the run."""
    if not path.is_file():
        return None
    try:
        model, header = load_compressed(path, device=device)
    except (ValueError, RuntimeError, OSError) as e:
        log(f"cache {path} is unusable ({e}); recalibrating over it")
        return None
    if header.get("calibration", {}).get("demo_cache_key") != key:
        log(f"cache {path} was written for other settings; recalibrating over it")
        return None
    return model


def calibrate_and_save(s: DemoSettings, path: Path, key: str, log: Callable) -> None:
    """Quick W4A8 calibration of the embedded model on random prompts, saved in the compressed
    checkpoint format (save_compressed writes a temporary file, then renames it)."""
    model, _ = load_embedded(device=s.device)
    captured = capture_embedded(model, n_samples=s.calib_samples, steps=s.calib_steps, device=s.device)
    settings = s.calib_settings()
    policy = default_policy(model, settings.w_bits, settings.a_bits)

    def progress(block, n_blocks, epoch, loss):
        log(f"calibrating block {block + 1}/{n_blocks}, epoch {epoch}/{settings.epochs}", end="\r")
    calibrate(model, captured, settings, policy, progress=progress)
    log("")
    calibration = {"settings": asdict(settings), "samples": s.calib_samples, "steps": s.calib_steps,
                   "demo_cache_key": key}
    save_compressed(model, path, policy, calibration=calibration, source_hash=file_sha256(WEIGHTS))


def compressed_model(s: DemoSettings, log: Callable):
    """(compressed model, cache path, "cached" or "calibrated in N s"). A fresh calibration is also
    loaded back from its file, so the first run and the cached runs use the very same model."""
    key = cache_key(s)
    path = cache_path(s, key)
    if not s.recalibrate:
        model = load_cached(path, key, s.device, log)
        if model is not None:
            return model, path, "cached"
    t0 = time.time()
    calibrate_and_save(s, path, key, log)
    status = f"calibrated in {time.time() - t0:.0f} s"
    model, _ = load_compressed(path, device=s.device)
    return model, path, status


# -- generation, timing, measurements -----------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, s: DemoSettings, on_step=None) -> RunStats:
    """Generate and time every DiT call (one per denoising step: guidance is embedded, no CFG)."""
    times, start = [], []

    def before(module, args, kwargs):
        _sync(s.device)
        start.append(time.perf_counter())

    def after(module, args, kwargs, output):
        _sync(s.device)
        times.append(time.perf_counter() - start[-1])

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    t0 = time.perf_counter()
    try:
        video = generate(model, [s.prompt], [s.seed], steps=s.steps, guidance=s.guidance, on_step=on_step).videos[0]
    finally:
        for h in handles:
            h.remove()
    return RunStats(video, sum(times) / len(times), time.perf_counter() - t0, analyse(video))


def sparse_generate(model, s: DemoSettings, on_step=None):
    """(RunStats, SSARAttention) of one run with SVG sparse attention + SSAR."""
    fn = SSARAttention(s.sparse_settings())
    with model.attention(fn):
        stats = timed_generate(model, s, on_step)
    return stats, fn


def mask_density(fn: SSARAttention) -> float:
    """Mean kept fraction of the block masks on the sparse (reuse) steps; nan if there were none."""
    return fn.stats["sparse_density"] / fn.stats["sparse"] if fn.stats["sparse"] else math.nan


def bf16_bytes(model) -> int:
    return sum(t.numel() * 2 for t in model.state_dict().values())


_DTYPE_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def checkpoint_tensor_bytes(path: Path, layers=None) -> int:
    """Bytes of the tensors stored in a safetensors file (its JSON header excluded); with `layers`,
    only the tensors of those modules."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if layers is None or k.rpartition(".")[0] in layers:
                sl = f.get_slice(k)
                total += math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
    return total


def linears_bytes(dense, path: Path) -> tuple:
    """(bf16, compressed) bytes of the linears the W4A8 policy quantizes: the compression where it
    applies. The rest of the model (embedders, token refiner, final layer) stays bf16 by policy."""
    layers = set(default_policy(dense))
    bf16 = sum(t.numel() * 2 for k, t in dense.state_dict().items() if k.rpartition(".")[0] in layers)
    return bf16, checkpoint_tensor_bytes(path, layers)


# -- outputs ------------------------------------------------------------------------------------------

def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = GAP) -> np.ndarray:
    """[F, H, W, 3] x 2 -> [F, H, 2W + gap, 3], a grey gap between."""
    f, h, w, c = left.shape
    out = np.full((f, h, 2 * w + gap, c), 128, dtype=np.uint8)
    out[:, :, :w], out[:, :, w + gap:] = left, right
    return out


def write_outputs(out: Path, dense: torch.Tensor, compressed: torch.Tensor) -> list:
    """The animation (dense left, QuantSparse right) and a two-row frame strip (dense on top)."""
    a, b = (to_uint8(v.permute(1, 2, 3, 0)) for v in (dense, compressed))
    top, bottom = strip(a), strip(b)
    rows = np.full((top.shape[0] * 2 + GAP, top.shape[1], 3), 255, dtype=np.uint8)
    rows[:top.shape[0]], rows[top.shape[0] + GAP:] = top, bottom
    paths = [out / SIDE_BY_SIDE, out / STRIP]
    write_apng(paths[0], side_by_side(a, b))
    write_png(paths[1], rows)
    return paths


# -- the run ------------------------------------------------------------------------------------------

def check_settings(s: DemoSettings) -> None:
    """Refuse bad input before any work or file: unknown words, bad density or calibration settings."""
    PromptEncoder().encode([s.prompt])  # ValueError names a word outside the vocabulary
    if s.steps < 1 or s.calib_samples < 1 or s.calib_steps < 1:
        raise ValueError("--steps and the calibration samples / steps must be at least 1")
    s.sparse_settings()
    s.calib_settings()
    if torch.device(s.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")


def run_demo(s: DemoSettings, log: Callable = print, progress: Callable = lambda total, label: None) -> DemoResult:
    """Dense vs compressed + sparse on one prompt and seed. progress(total, label) -> on_step callback.
    On CUDA each model runs once untimed first, so Triton compilation is not counted as step time."""
    check_settings(s)
    dense, _ = load_embedded(device=s.device)
    cmodel, cache, status = compressed_model(s, log)
    if torch.device(s.device).type == "cuda":
        timed_generate(dense, s)
        sparse_generate(cmodel, s)
    d = timed_generate(dense, s, progress(s.steps, "dense        "))
    c, fn = sparse_generate(cmodel, s, progress(s.steps, "QuantSparse  "))
    outputs = write_outputs(s.out, d.video, c.video)
    return DemoResult(s, d, c, psnr=psnr(c.video, d.video), ssim=ssim(c.video, d.video),
                      dense_bytes=bf16_bytes(dense), compressed_bytes=checkpoint_tensor_bytes(cache),
                      linears_bytes=linears_bytes(dense, cache), mask_density=mask_density(fn),
                      effective_density=fn.effective_density(), cache=cache, cache_status=status, outputs=outputs)

#!/usr/bin/env python
"""The product path, timed: HunyuanVideo-13B (random weights) sampled through ComfyUI's own loader and
sampler, in-process, 50 steps, wall-clock of the whole sampling. --preset hunyuan-video-1.5-8b times
HunyuanVideo 1.5 T2V (8.3B) the same way: ComfyUI detects it as its HunyuanVideo15 model, the latent is
EmptyHunyuanVideo15Latent's (32 channels, 1/16 spatial, patch 1), `720p` is 1280x720x121 there, and the
conditioning is 3584-wide text tokens, unpadded, with pooled_output None (v15_extras); e.g.
    python3 benchmarks/gpu_benchmark.py --product --preset hunyuan-video-1.5-8b --configs Q,A --resolutions 720p \
        --baseline-steps 720p=3

    PYTHONPATH=.devcarry/site COMFYUI_PATH=.devcarry/ComfyUI python3 benchmarks/comfy_product.py \\
        [--configs A,A8,Q] [--resolutions 544p,720p] [--steps 50] [--baseline-steps 720p=3] \\
        [--cap-gb 24] [--budget-s 540] [--out FILE.json]
    python3 benchmarks/comfy_product.py --merge run1.json run2.json --out merged.json   # targets over several runs

Configurations (each loaded, sampled and freed in turn, in this one process):
  A   ComfyUI native: the bf16 state dict through `comfy.sd.load_diffusion_model_state_dict`, ComfyUI's
      default attention (SDPA with HunyuanVideo's additive text mask);
  A8  the same with model_options {"dtype": float8_e4m3fn} (UNETLoader's weight_dtype fp8_e4m3fn);
  Q   the same weights RTN-quantized to W4A8 (quantsparse_core default policy), saved as a compressed
      checkpoint, loaded by the pack's Load Compressed DiT (nodes/comfy_ops.load_compressed_patcher) and
      patched by nodes/sparse_patch.apply_sparse(patcher, SparseSettings()) = Sparse Sampler's defaults.
  C   (Q)'s checkpoint and settings run by quantsparse_core alone (io.load_compressed, fuse_small_ops,
      SSARAttention, the core's Euler sampler with the same conditioning): the "(Q) within 5% of the core"
      target compares the two on the same card in the same process.
  AK  (A) with ComfyUI's "comfy kitchen attention" (ModelAttentionBackend / --use-ck-attention: comfy-kitchen's
      INT8 attention), ComfyUI >= 0.33 with kitchen's CUDA extension; refused with the reason elsewhere.
  QK  (Q) with its dense passes on (AK)'s attention (Sparse Sampler dense_attention comfyui).
  A8F, QI, QL: see --configs.
Sampling is `comfy.sample.sample` (what ComfyUI's KSampler / common_ksampler calls): euler, simple,
cfg 1.0, a random 256-token x 4096 text conditioning with ComfyUI's attention mask (200 real tokens),
pooled output, guidance 6.0 (HunyuanVideo's workflow; 1.5's differs: v15_extras). Each step is timed by a
callback with a device sync; step kinds of Q follow the SparseSettings schedule and are checked against what SSAR actually did.
A tiny sampling run first (same model, 8 steps, small latent) loads the model and compiles the kernels,
so the timed run measures sampling; its time is reported as warm_s.

--cap-gb N caps the process like an N GiB card: torch's per-process memory fraction for the allocator
(N GiB - 0.5 GiB for the CUDA context), and ComfyUI / SSAR's auto cache placement told the same through
torch.cuda.mem_get_info reporting (N GiB - 0.5 GiB - reserved, N GiB - 0.5 GiB), so ComfyUI offloads
weights as on such a card instead of failing.

The pack's modules are imported from their files (nodes/comfy_ops.py, nodes/sparse_patch.py): the
package's __init__ needs comfy_api, which needs PyAV, absent on the GPU machine.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import types
import zlib
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_peak  # noqa: E402  (benchmarks/memory_peak.py)
from step_profile import StepProfiler  # noqa: E402  (benchmarks/step_profile.py)

RESOLUTIONS = {"544p": (960, 544, 129), "720p": (1280, 720, 129),  # width, height, frames
               "wan720p": (1280, 720, 81), "wan480p": (832, 480, 81)}  # Wan 2.1's defaults (EmptyHunyuanLatentVideo)
# HunyuanVideo 1.5 names its sizes with 121 frames (its 720p / 480p T2V checkpoints, EmptyHunyuanVideo15Latent):
# for a 1.5 preset these names win over RESOLUTIONS, so `720p` there is 1280x720x121 and the 13B's stays 129 frames.
V15_RESOLUTIONS = {"720p": (1280, 720, 121), "480p": (848, 480, 121)}
BASE_PRESET = "hunyuan-video-13b"   # the preset PRIORS were measured on; others' priors are scaled from it
V15_PRESET = "hunyuan-video-1.5-8b"
CONFIGS = ("A", "A8", "A8F", "AK", "Q", "C", "QI", "QK", "QL", "QM")
BASELINE_CONFIGS = ("A", "A8", "A8F", "AK")  # ComfyUI's own model, dense
SPARSE_CONFIGS = ("Q", "C", "QI", "QK", "QL", "QM")
CONFIG_NAMES = {"A": "ComfyUI native bf16, default attention",
                "A8": "ComfyUI weight_dtype fp8_e4m3fn",
                "A8F": "ComfyUI weight_dtype fp8_e4m3fn_fast (fp8 matmuls where the GPU has them: ComfyUI's fastest stock)",
                "AK": "ComfyUI bf16 with its comfy kitchen INT8 attention (ModelAttentionBackend, ComfyUI >= 0.33)",
                "Q": "Load Compressed DiT (W4A8 RTN) + Sparse Sampler defaults",
                "C": "quantsparse_core alone: (Q)'s checkpoint (io.load_compressed), fused small ops, SSARAttention "
                     "with (Q)'s settings, the core's Euler sampler (no ComfyUI)",
                "QI": "(Q) with INT8 dense passes (Sparse Sampler int8_attention: warm-up steps, first blocks, refreshes)",
                "QK": "(Q) with its dense passes on ComfyUI's comfy kitchen INT8 attention (Sparse Sampler dense_attention "
                      "comfyui after a Model Attention Backend; ComfyUI >= 0.33)",
                "QL": "(Q) + stacked random LoRAs through ComfyUI's LoRA loader (--loras, --lora-rank)",
                "QM": "(Q) with merged refreshes (SparseSettings.merged_refresh: a refresh's full attention as our kernel "
                      "over the mask and its complement, instead of cuDNN + the sparse pass)"}
GIB = 2 ** 30
CONTEXT_GIB = 0.5      # what a real card loses to the CUDA context, outside torch's allocator
WARM_LATENT = (17, 256, 256)  # frames, height, width of the warm-up run: 5 x 16 x 16 latent tokens (13B and 1.5)
COMPACT_WARM_STEPS = 4  # refresh, reuse, refresh, second-order reuse (Bench.compact_settings)
WARM_STEPS = 8         # dense, refresh1, reuse x4, refresh2, reuse2a with the default schedule
STALL_RATIO = 1.2
BUDGET_S = 560.0       # --budget-s default: one call of under 10 minutes on the GPU machine, with room to save
TARGETS = (  # (name, kind, resolution, target)
    ("(Q) vs (A), 720p/129f, 50-step sampling wall-clock", "ratio:A", "720p", 3.0),
    ("(Q) vs (A), 544p/129f, 50-step sampling wall-clock", "ratio:A", "544p", 2.7),
    ("(Q) vs (A8), 544p/129f, 50-step sampling wall-clock", "ratio:A8", "544p", 2.5),
    ("(Q) completes 50 steps at 544p/129f within 24 GB", "tier:24", "544p", 24),
    ("(Q) completes 50 steps at 544p/129f within 16 GB", "tier:16", "544p", 16),
    ("(Q) completes 50 steps at 720p/129f within 24 GB", "tier:24", "720p", 24),
    ("no step slower than 1.2x its kind's median (measured 50-step runs)", "stall", None, STALL_RATIO),
)
# Step-time priors (s), used only to skip what would not fit --budget-s; replaced by measured times as
# the run goes. Measured on one H100 on 2026-12-06 (benchmarks/results/2026-12-06_product_*_h100.json; 544p
# (A) and (Q) with kitchen's CUDA RoPE); the fp8 rows and (Q)'s first compiles are not in them, so they stay a
# little pessimistic.
PRIORS = {"544p": {"A": 10.5, "A8": 10.8, "A8F": 11.0, "AK": 10.5, "dense": 7.05, "refresh": 8.6, "reuse": 2.28},
          "720p": {"A": 31.0, "A8": 31.0, "A8F": 33.0, "AK": 31.0, "dense": 20.4, "refresh": 25.1, "reuse": 5.8}}
# Load priors (s) of the full-size presets, the 13B's: the 8.3B HunyuanVideo 1.5 loads less, so they stay pessimistic.
LOAD_PRIOR_S = {"A": 60.0, "A8": 60.0, "A8F": 60.0, "AK": 60.0, "Q": 90.0, "C": 90.0, "QI": 90.0, "QK": 90.0, "QL": 100.0, "QM": 90.0}
# issue 20 (H200): W4A8 + 15% + SSAR with INT8 attention, 50 steps at 720p/129f, against dense bf16; shown where (QI) ran
# ComfyUI's fastest stock weights (fp8 matmuls): the bar for (Q) that the fp8 row sets, shown where (A8F) ran
FP8_FAST_TARGET = ("(Q) vs (A8F), 544p/129f, 50-step sampling wall-clock", "ratio:A8F", "544p", 2.5)
# issue 20: ComfyUI's own INT8 attention (comfy kitchen), its best stock attention; shown where (AK) ran
CK_TARGET = ("(Q) vs (AK), 544p/129f, 50-step sampling wall-clock: faster than ComfyUI's comfy kitchen INT8 attention",
             "ratio:AK", "544p", 1.0)
# issue 19: the product path as fast as the core alone, on the same card in the same run; shown where (C) ran
CORE_TARGET = ("(Q) inside ComfyUI within 5% of quantsparse_core alone (C), same checkpoint and settings, 50 steps",
               "core", None, 1.05)
INT8_TARGET = ("(QI) vs (A), 720p/129f, 50-step sampling wall-clock (INT8 dense passes)", "ratio:A:QI", "720p", 4.0)
CK_INT8_TARGET = ("(QK) vs (A), 720p/129f, 50-step sampling wall-clock (dense passes on ComfyUI's INT8 attention)",
                  "ratio:A:QK", "720p", 4.0)
# Wan (issue 18): ComfyUI's WanModel, Wan2.1-14B architecture, random weights.
WAN_TARGETS = (
    ("(Q) vs (A), Wan2.1-14B 1280x720x81, 50-step sampling wall-clock", "ratio:A", "wan720p", 2.5),
    ("no step slower than 1.2x its kind's median (measured 50-step runs)", "stall", None, STALL_RATIO),
)
# HunyuanVideo 1.5 (issue 17): ComfyUI's HunyuanVideo15 model, 8.3B T2V architecture, random weights.
V15_TARGETS = (
    ("(Q) vs (A), HunyuanVideo 1.5, 720p x 121, 50-step sampling wall-clock", "ratio:A", "720p", 2.5),
    ("no step slower than 1.2x its kind's median (measured 50-step runs)", "stall", None, STALL_RATIO),
)
# issue 20: 4- and 8-step sampling (the Sparse Sampler's few-step schedule); shown where (Q) ran at that step count
FEW_STEP_TARGETS = tuple((f"(Q) vs (A), 720p/129f, {n}-step sampling wall-clock (few-step schedule)", f"ratio:A:Q:{n}",
                          "720p", 2.0) for n in (4, 8))
LORA_TARGET = ("3 stacked LoRAs on (Q), {size}: sampling time over (Q)'s, same steps", "lora", "720p", 1.10)


def log(*a):
    print(*a, flush=True)


# ---- schedule ------------------------------------------------------------------------------------
def step_kinds(settings, steps: int):
    """(coarse, fine) kinds of the `steps` steps SSARAttention runs under `settings` (its StepPlan: the
    standard schedule, or few-step where "auto" picks it): coarse is dense (warm-up) / refresh / reuse; fine
    splits refresh1 (first-order only) / refresh2 and reuse (after a first-order refresh) / reuse2a (first
    step after a second-order refresh) / reuse2."""
    plan = settings.plan(steps)
    coarse, fine, refreshes, last = [], [], 0, None
    for i in range(steps):
        kind = plan.kind(i)
        coarse.append(kind)
        if kind == "refresh":
            last = "refresh1" if refreshes == 0 or plan.order < 2 else "refresh2"
            fine.append(last)
            refreshes += 1
        elif kind == "reuse":
            fine.append(("reuse2a" if fine[-1] == "refresh2" else "reuse2") if last == "refresh2" else "reuse")
        else:
            fine.append(kind)
    return coarse, fine


def kind_stats(per_step):
    """{kind: n, median, mean, max, total} over measured steps, and the worst step / median ratio."""
    by = {}
    for s in per_step:
        by.setdefault(s["kind"], []).append(s["s"])
    out = {}
    for k, v in by.items():
        med = statistics.median(v)
        out[k] = dict(n=len(v), median_s=med, mean_s=sum(v) / len(v), max_s=max(v), total_s=sum(v),
                      worst_ratio=max(v) / med if med > 0 else None)
    return out


# ---- ComfyUI in-process ----------------------------------------------------------------------------
KITCHEN_CUDA_XZ = ROOT / ".devcarry" / "kitchen_cuda" / "_C.abi3.so.xz"   # scripts/prepare_device_carry.sh


def unpack_kitchen_cuda() -> str:
    """comfy_kitchen's CUDA extension travels xz-compressed (143 MB unpacked, 19 MB packed, under the 64 MiB
    carry limit); put it back where the carried comfy_kitchen looks for it, before ComfyUI imports kitchen, so
    ComfyUI's RoPE and fp8 paths run as on a user's machine. Returns what happened (for the results)."""
    import lzma
    spec = importlib.util.find_spec("comfy_kitchen")
    if spec is None or not spec.submodule_search_locations:
        return "comfy_kitchen not importable"
    target = Path(list(spec.submodule_search_locations)[0]) / "backends" / "cuda" / "_C.abi3.so"
    if target.is_file():
        return f"present: {target}"
    if not KITCHEN_CUDA_XZ.is_file():
        return f"missing: {target} (no {KITCHEN_CUDA_XZ.name} carried)"
    tmp = target.with_name(target.name + ".tmp")
    with lzma.open(KITCHEN_CUDA_XZ) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    tmp.replace(target)
    return f"unpacked: {target}"


class Comfy:
    """ComfyUI imported in this process (from COMFYUI_PATH), told the VRAM cap if any."""

    def __init__(self, path, device: str, cap_gb=None):
        self.path = Path(path).resolve()
        if not (self.path / "comfy" / "ldm" / "hunyuan_video" / "model.py").is_file():
            sys.exit(f"{self.path} is not a ComfyUI checkout (no comfy/ldm/hunyuan_video/model.py): set COMFYUI_PATH "
                     "or --comfyui (on the GPU machine: .devcarry/ComfyUI from scripts/prepare_device_carry.sh)")
        if str(self.path) not in sys.path:
            sys.path.insert(1, str(self.path))  # after the repository: the pack's modules load by path anyway
        self.kitchen_cuda = unpack_kitchen_cuda()
        self.device = device
        self.cap_bytes = None
        if cap_gb:
            self._cap(cap_gb)
        from comfy.cli_args import args
        if device == "cpu":
            args.cpu = True
        import comfy.model_management as mm
        for name in ("comfy.patcher_extension", "comfy.sample", "comfy.samplers", "comfy.sd", "comfy.utils"):
            importlib.import_module(name)  # now, before the pack's modules, which use them as submodules of comfy
        self.mm = mm
        ns = {}
        exec((self.path / "comfyui_version.py").read_text(), ns)
        self.version = ns.get("__version__", "unknown")
        self.comfy_ops = _load_pack_module("comfy_ops")
        self.sparse_patch = _load_pack_module("sparse_patch")
        self.fused_blocks = _load_pack_module("fused_blocks", optional=True)
        StepTimer.SPARSE_KEY = self.sparse_patch.KEY

    def _cap(self, cap_gb: float):
        if self.device != "cuda":
            raise SystemExit("--cap-gb needs a CUDA device")
        dev = torch.device("cuda", torch.cuda.current_device())
        total = torch.cuda.get_device_properties(dev).total_memory
        cap = int((cap_gb - CONTEXT_GIB) * GIB)
        if cap >= total:
            raise SystemExit(f"--cap-gb {cap_gb} is not below this GPU's {total / GIB:.1f} GiB")
        torch.cuda.set_per_process_memory_fraction(cap / total, dev)
        real = torch.cuda.mem_get_info

        def mem_get_info(device=None):  # what a card of `cap` bytes would report to this process
            free, _ = real(device)
            return max(0, min(free, cap - torch.cuda.memory_reserved(device))), cap
        torch.cuda.mem_get_info = mem_get_info
        torch.cuda.memory.mem_get_info = mem_get_info
        self.cap_bytes = cap

    def load_compressed_dit(self, path):
        """What the Load Compressed DiT node's execute() does with the file (nodes/model_nodes.py)."""
        patcher = self.comfy_ops.load_compressed_patcher(path)
        family = _load_pack_module("model_family")
        if self.fused_blocks is not None and hasattr(self.fused_blocks, "apply_fused_blocks") \
                and family.classify(patcher) in getattr(family, "FUSED", family.SPARSE):
            patcher = self.fused_blocks.apply_fused_blocks(patcher)
        return patcher

    def view(self) -> dict:
        """What ComfyUI sees: total and free VRAM, its VRAM state, kitchen's backends."""
        mm = self.mm
        dev = mm.get_torch_device()
        out = dict(device=str(dev), vram_state=mm.vram_state.name,
                   total_gb=round(mm.get_total_memory(dev) / 1e9, 2),
                   free_gb=round(mm.get_free_memory(dev) / 1e9, 2),
                   reserved_extra_gb=round(mm.extra_reserved_memory() / 1e9, 2))
        try:
            import comfy.quant_ops
            out["kitchen_backends"] = {k: v["available"] and not v.get("disabled", False)
                                       for k, v in comfy.quant_ops.ck.list_backends().items()}
        except Exception as e:  # reported, not fatal
            out["kitchen_backends"] = f"unavailable: {e}"
        return out

    def free(self):
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


PACK = "quantsparse_pack_nodes"


def set_kernel_lazy(on: bool) -> list:
    """The attention kernels' lazy rescaling (their LAZY constants), in the one kernels package every caller
    imports (quantsparse_core.dispatch.PACKAGE). Returns the modules set."""
    from quantsparse_core import dispatch
    mods = [importlib.import_module(f"{dispatch.PACKAGE}.{name}") for name in ("sparse_attention", "int8_attention")]
    for m in mods:
        m.LAZY = bool(on)
    return mods


def _load_pack_module(name: str, optional: bool = False):
    """nodes/<name>.py, imported as a module of the pack's `nodes` folder registered under another name
    (ComfyUI has its own top-level `nodes`) whose __init__ is not run: it registers the V3 nodes through
    comfy_api, which needs PyAV, absent on the GPU machine. Relative imports between the pack's modules
    work as in ComfyUI."""
    if PACK not in sys.modules:
        pkg = types.ModuleType(PACK)
        pkg.__path__ = [str(ROOT / "nodes")]
        pkg.__package__ = PACK
        sys.modules[PACK] = pkg
    if optional and not (ROOT / "nodes" / f"{name}.py").is_file():
        return None
    return importlib.import_module(f"{PACK}.{name}")


# ---- random weights ----------------------------------------------------------------------------------
def _fan_in(shape) -> int:
    return max(1, math.prod(shape[1:]))


def random_tensor(name: str, shape, like: dict, device, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor filled on `device` in `dtype` (never a float32 host copy): linear/conv weights and their
    biases uniform(+-1/sqrt(fan_in)) as torch's default init, 1-D norm weights ones. Seeded by name,
    so (A), (A8) and (Q) hold the same random model."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    if len(shape) == 1 and not name.endswith("bias"):
        return t.fill_(1.0)
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % (2 ** 63))
    w_shape = shape if len(shape) >= 2 else like.get(name[: -len("bias")] + "weight", (1, 4096))
    bound = 1.0 / math.sqrt(_fan_in(w_shape))
    return t.uniform_(-bound, bound, generator=g)


def is_wan(preset: str) -> bool:
    from quantsparse_core.models import WAN_PRESETS
    return preset in WAN_PRESETS


def is_v15(preset: str) -> bool:
    """A HunyuanVideo 1.5 (T2V/I2V) architecture: ComfyUI builds its HunyuanVideo15 model and latent format."""
    from quantsparse_core.models.config import V15, get_preset
    return not is_wan(preset) and get_preset(preset).variant == V15


def model_config(preset: str):
    from quantsparse_core.models import get_preset, get_wan_preset
    return get_wan_preset(preset) if is_wan(preset) else get_preset(preset)


def meta_model(preset: str):
    from quantsparse_core.models import HunyuanVideoDiT, WanDiT, get_preset, get_wan_preset
    if is_wan(preset):
        return WanDiT(get_wan_preset(preset), device="meta")
    return HunyuanVideoDiT(get_preset(preset), device="meta")


def comfy_class(preset: str) -> str:
    """The diffusion-model class ComfyUI must build for the preset."""
    return "WanModel" if is_wan(preset) else "HunyuanVideo"


def comfy_model_class(preset: str):
    """The model_base class ComfyUI must wrap it in, where it tells variants apart: 1.0 and 1.5 share the
    diffusion class, and only HunyuanVideo15 builds 1.5's conditioning (zero image channels + mask) and latent
    format. None: not checked (Wan's depends on the variant)."""
    if is_wan(preset):
        return None
    return "HunyuanVideo15" if is_v15(preset) else "HunyuanVideo"


class RandomWeights(Mapping):
    """The random model's tensors by key, each made on `device` when read (random_tensor: seeded by name, so
    every config holds the same model), never all at once; `shapes`: the same keys as meta tensors, from which
    io/rtn.py reads the architecture without making any."""

    def __init__(self, preset: str, device, seed: int):
        self.shapes = meta_model(preset).state_dict()
        self.dims = {k: tuple(v.shape) for k, v in self.shapes.items()}
        self.device, self.seed = device, seed

    @torch.no_grad()
    def __getitem__(self, key):
        return random_tensor(key, self.dims[key], self.dims, self.device, self.seed)

    def __iter__(self):
        return iter(self.dims)

    def __len__(self):
        return len(self.dims)


def random_state_dict(preset: str, device, seed: int) -> dict:
    weights = RandomWeights(preset, device, seed)
    return {k: weights[k] for k in weights}


@torch.no_grad()
def add_random_loras(patcher, n: int, rank: int, device, seed: int):
    """`n` random rank-`rank` LoRAs on every linear of every double and single block (where community
    HunyuanVideo LoRAs put theirs), stacked through comfy.sd.load_lora_for_models as LoraLoaderModelOnly
    does (Wan: every linear of `blocks.*`). Returns (the patched MODEL, a summary). Refuses if ComfyUI matched
    none of their keys."""
    import comfy.sd
    dm = patcher.model.diffusion_model
    targets = {}
    for name, m in dm.named_modules():
        if name.startswith(("double_blocks.", "single_blocks.", "blocks.")) and isinstance(getattr(m, "in_features", None), int) \
                and hasattr(m, "weight"):  # quantized layers included: their weight is an empty placeholder
            targets[name] = (m.out_features, m.in_features)
    # a compressed layer keeps its packed linear as a child ('.quant'): the LoRA goes on the layer itself
    targets = {n: v for n, v in targets.items() if not any(n.startswith(o + ".") for o in targets)}
    if not targets:
        raise RuntimeError("no block linears found to put LoRAs on")
    gen = torch.Generator(device="cpu").manual_seed(seed + 7)
    params = 0
    for _ in range(n):
        sd = {}
        for name, (out_f, in_f) in targets.items():
            k = f"diffusion_model.{name}"
            sd[f"{k}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) / in_f ** 0.5).to(device, torch.bfloat16)
            sd[f"{k}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 1e-3).to(device, torch.bfloat16)
            sd[f"{k}.alpha"] = torch.tensor(float(rank))
            params += rank * (in_f + out_f)
        patcher = comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)[0]
        del sd
    patched = sum(1 for k, v in patcher.patches.items() if k.endswith(".weight") and len(v) >= n)
    if not patched:
        raise RuntimeError("ComfyUI applied none of the random LoRAs' keys")
    return patcher, dict(count=n, rank=rank, layers=len(targets), patched_layers=patched,
                         params_m=round(params / 1e6, 1))


def build_compressed(preset: str, path: Path, device, seed: int) -> dict:
    """RTN W4A8 checkpoint of the same random weights (io/rtn.py: one linear at a time on `device`, the
    default policy, no calibration); returns its storage summary."""
    from quantsparse_core.io.checkpoint import save_compressed
    from quantsparse_core.io.rtn import quantize_state_dict
    from quantsparse_core.quant.policy import storage_bytes

    model, policy, _ = quantize_state_dict(RandomWeights(preset, device, seed), 4, 8, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_compressed(model, path, policy, calibration={"method": "rtn", "note": "random weights, speed benchmark"},
                    source_hash=f"random-seed-{seed}")
    return storage_bytes(meta_model(preset), policy)


# ---- conditioning and latents ----------------------------------------------------------------------
def conditioning(preset: str, text_tokens: int, seed: int):
    """ComfyUI CONDITIONING as TextEncodeHunyuanVideo + FluxGuidance make it: [[context, extras]]; for Wan
    as CLIPTextEncode with umt5-xxl does (tokens x 4096, no mask, no pooled output, no guidance)."""
    from quantsparse_core.models import get_preset, get_wan_preset
    g = torch.Generator().manual_seed(seed)
    if is_wan(preset):
        return [[torch.randn(1, text_tokens, get_wan_preset(preset).text_dim, generator=g), {}]], text_tokens
    cfg = get_preset(preset)
    ctx = torch.randn(1, text_tokens, cfg.context_in_dim, generator=g)
    if is_v15(preset):
        return [[ctx, v15_extras()]], text_tokens
    real = max(1, text_tokens * 200 // 256)
    mask = torch.zeros(1, text_tokens, dtype=torch.long)
    mask[:, :real] = 1
    extras = {"attention_mask": mask, "guidance": 6.0}
    if cfg.vec_in_dim:
        extras["pooled_output"] = torch.randn(1, cfg.vec_in_dim, generator=g)
    return [[ctx, extras]], real


def v15_extras() -> dict:
    """HunyuanVideo 1.5 T2V's conditioning extras as ComfyUI's CLIPTextEncode with its Qwen2.5-VL encoder gives a
    prompt. pooled_output None: 1.5 has no pooled-text input, but HunyuanVideo.encode_adm (which HunyuanVideo15
    inherits) reads the key, and the encoder sets it to None. No attention_mask: 1.5's tokenizer does not pad
    (the 1.0 one pads to 256), so the mask is all ones and HunyuanVideo15.extra_conds drops it; (A) then runs
    ComfyUI's unmasked attention, as in the stock workflow. No guidance (1.5 has no guidance embedding; its
    workflow has no FluxGuidance), no byT5 tokens (only for quoted text) and no image tokens (I2V only)."""
    return {"pooled_output": None}


def named_resolutions(preset: str) -> dict:
    """The resolution names valid for the preset: 1.5's own (121 frames) over the shared ones."""
    return {**RESOLUTIONS, **V15_RESOLUTIONS} if is_v15(preset) else RESOLUTIONS


def parse_resolution(name: str, preset: str = BASE_PRESET):
    """A named size ('544p', '720p': 129 frames, but 121 for HunyuanVideo 1.5) or WIDTHxHEIGHTxFRAMES ->
    (width, height, frames)."""
    names = named_resolutions(preset)
    if name in names:
        return names[name]
    try:
        w, h, f = (int(x) for x in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"unknown resolution {name!r}: use one of {sorted(names)} or WIDTHxHEIGHTxFRAMES") from None
    if w % 16 or h % 16 or (f - 1) % 4:
        raise SystemExit(f"resolution {name}: width and height must be multiples of 16 and frames 4k+1")
    return w, h, f


def latent_geometry(preset: str):
    """(latent channels, spatial downscale) of the empty latent ComfyUI's stock graph gives the preset:
    EmptyHunyuanLatentVideo's 16 channels at 1/8 (HunyuanVideo 1.0, Wan 2.1), EmptyHunyuanVideo15Latent's 32
    at 1/16 (1.5: latent_formats.HunyuanVideo15). Both compress time by 4 (frames 4k+1 -> k+1)."""
    return (32, 16) if is_v15(preset) else (16, 8)


def latent_shape(res, preset: str = BASE_PRESET):
    """The stock empty latent (EmptyHunyuanLatentVideo / EmptyHunyuanVideo15Latent) for (width, height, frames)."""
    w, h, f = res
    channels, down = latent_geometry(preset)
    return (1, channels, (f - 1) // 4 + 1, h // down, w // down)


def video_tokens(shape, preset: str = BASE_PRESET) -> int:
    """Video tokens of a latent after the model's patchify: 1x2x2 for 1.0 and Wan, 1x1x1 for 1.5."""
    pt, ph, pw = model_config(preset).patch_size
    return (shape[2] // pt) * (shape[3] // ph) * (shape[4] // pw)


# ---- one sampling run ------------------------------------------------------------------------------
def _split_top(text: str) -> list:
    """text split at the commas outside brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def kernel_args(repr_text: str) -> dict:
    """{argument: its specialisation} from the repr Triton's compile hook passes
    ("name[num_warps=...](a: spec, b: spec, ...)"); {} if it has another form."""
    start = repr_text.find("](")
    if start < 0 or not repr_text.endswith(")"):
        return {}
    out = {}
    for part in _split_top(repr_text[start + 2:-1]):
        name, sep, spec = part.partition(": ")
        if sep:
            out[name.strip()] = spec.strip()
    return out


def spec_diff(old: dict, new: dict) -> list:
    """["arg: old -> new", ...] for the arguments whose specialisation differs."""
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class CompileLog:
    """Every Triton compile of the process (warm-up runs included), through Triton's post-compile hook,
    installed once: a compile in a timed step is then compared with all earlier compiles of its kernel,
    the warm-up's too (a per-run record saw only the timed run's own, so the first reuse step's compile,
    whose earlier variants came from the warm-up, went unexplained)."""

    def __init__(self):
        self.seen = {}  # kernel -> argument specialisations compiled so far
        self.names, self.differences = [], []  # since the last take(): kernels compiled, what made them new
        self.hooked = False
        try:
            from triton import knobs  # Triton >= 3.4
            knobs.runtime.jit_post_compile_hook = self.hook
            self.hooked = True
        except (ImportError, AttributeError):
            try:
                from triton.runtime.jit import JITFunction
                JITFunction.compiled_hook = self.hook
                self.hooked = True
            except (ImportError, AttributeError):
                pass

    def hook(self, *args, **kwargs):
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or getattr(getattr(fn, "fn", fn), "__name__", None) or str(fn)[:60]
        self.names.append(name)
        new = kernel_args(kwargs.get("repr", ""))
        known = self.seen.setdefault(name, [])
        if known and new:  # which arguments' specialisation made this compile: the nearest earlier one's differences
            self.differences.append(dict(kernel=name, differs=min((spec_diff(old, new) for old in known), key=len)[:10]))
        if new:
            known.append(new)
        return False

    def take(self) -> dict:
        """Compiles since the previous take(): count, kernel names, new specialisations."""
        names, diffs = self.names, self.differences
        self.names, self.differences = [], []
        if not self.hooked:
            return {}
        out = dict(triton_compiles=len(names), triton_kernels=sorted(set(names))[:12])
        if diffs:
            out["triton_new_specialisations"] = diffs[:6]
        return out


_COMPILE_LOG = None


def compile_log() -> CompileLog:
    """The process's one CompileLog (installing Triton's hook the first time)."""
    global _COMPILE_LOG
    if _COMPILE_LOG is None:
        _COMPILE_LOG = CompileLog()
    return _COMPILE_LOG


class StallTrace:
    """What happened inside each step besides its math, to explain stalled steps: Triton kernels compiled
    (JIT cache misses, autotuner candidates included, with the arguments that made each one new against every
    earlier compile in the process), new torch.compile graphs, and the caching allocator's device allocations
    and out-of-memory retries (each retry frees the cache and synchronizes)."""

    def __init__(self, cuda: bool, log: CompileLog = None):
        self.cuda = cuda
        self.log = log or compile_log()
        self.log.take()  # compiles before this run (warm-up) are known kernels, not this run's events
        self.last = self._counters()

    def _counters(self) -> dict:
        out = {}
        try:
            from torch._dynamo.utils import counters
            out["graphs"] = int(counters["stats"]["unique_graphs"])
        except Exception:
            pass
        if self.cuda:
            st = torch.cuda.memory_stats()
            out["device_allocs"] = int(st.get("num_device_alloc", st.get("segment.all.allocated", 0)))
            out["alloc_retries"] = int(st.get("num_alloc_retries", 0))
        return out

    def take(self) -> dict:
        """Events since the previous call (the step that just ended)."""
        now = self._counters()
        out = {k: now[k] - self.last.get(k, 0) for k in now}
        out.update(self.log.take())
        self.last = now
        return out


def warm_compiles(events: list) -> dict:
    """A warm-up run's Triton compiles summed over its steps' events: count, kernels, and what made each new
    (so a variant that the warm-up compiles at the timed latent, and would otherwise stall a timed step, is named)."""
    kernels = sorted({k for e in events for k in e.get("triton_kernels", [])})
    new = [d for e in events for d in e.get("triton_new_specialisations", [])]
    return dict(triton_compiles=sum(e.get("triton_compiles", 0) for e in events), triton_kernels=kernels[:16],
                triton_new_specialisations=new[:12])


class StepTimer:
    """Per-step wall-clock: a DIFFUSION_MODEL wrapper marks each model call's start (synchronized) and
    reads what SSAR did in it; ComfyUI's sampler callback marks each step's end (synchronized)."""

    KEY = "quantsparse_benchmark"
    SPARSE_KEY = "quantsparse_sparse"  # set from nodes/sparse_patch.KEY when ComfyUI is imported

    def __init__(self, cuda: bool, on_step=None):
        self.cuda, self.on_step = cuda, on_step
        self.starts, self.ends, self.observed = [], [], []
        self.trace, self.events = StallTrace(cuda), []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _sparse_counts(to):
        run = (to or {}).get(StepTimer.SPARSE_KEY)  # the run's SparseRun (nodes/sparse_patch.py)
        if run is None:
            return None
        stats = [a.stats for a in run.by_group.values()]
        return tuple(sum(s[k] for s in stats) for k in ("dense", "sparse", "refresh"))

    def wrapper(self, executor, *args, **kwargs):
        to = kwargs.get("transformer_options")
        if not isinstance(to, dict):
            to = next((a for a in reversed(args) if isinstance(a, dict)), {})
        self.starts.append(self.now())
        before = self._sparse_counts(to)
        out = executor(*args, **kwargs)
        after = self._sparse_counts(to)
        if before is None or after is None:
            self.observed.append(None)
        else:
            _, sparse, refresh = (a - b for a, b in zip(after, before))
            self.observed.append("reuse" if sparse > 0 else "refresh" if refresh > 0 else "dense")
        return out

    def callback(self, i, x0, x, total):
        self.ends.append(self.now())
        self.events.append(self.trace.take())
        if self.on_step is not None:
            self.on_step(i, total)

    def steps(self):
        out = []
        for i, end in enumerate(self.ends):
            begin = self.ends[i - 1] if i else self.starts[0]
            out.append(dict(i=i, s=end - begin, observed=self.observed[i] if i < len(self.observed) else None,
                            events=self.events[i] if i < len(self.events) else {}))
        return out


class _StopSampling(Exception):
    """Raised from the step callback to end a run after its timed steps (see run_sampling)."""


def run_sampling(cx, patcher, shape, cond, steps: int, last_step, seed: int, timer=None):
    """comfy.sample.sample over the `steps`-step schedule, stopped after `last_step` steps when given, timed by
    `timer`. Returns (seconds of the whole sample() call, whether the output is finite). The stop comes from
    the step callback, not ComfyUI's last_step: last_step cuts the sigmas the sampler hands the model, so the
    sparse schedule would be planned for `last_step` steps instead of the first steps of the real schedule."""
    import comfy.patcher_extension
    import comfy.sample

    timer = timer or StepTimer(cx.device == "cuda")
    model = patcher.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, StepTimer.KEY, timer.wrapper)
    latent = torch.zeros(shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    state = {}

    def callback(i, x0, x, total):
        timer.callback(i, x0, x, total)
        if last_step is not None and i + 1 >= last_step:
            state["finite"] = bool(torch.isfinite(x0).all())  # the model's prediction at the last timed step
            raise _StopSampling

    t0 = timer.now()
    try:
        with torch.inference_mode():  # as ComfyUI executes every node
            out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, denoise=1.0,
                                      callback=callback, disable_pbar=True, seed=seed)
        finite = bool(torch.isfinite(out).all())
    except _StopSampling:
        finite = state["finite"]
    return timer.now() - t0, finite


class CoreModel:
    """(C): the compressed checkpoint run by quantsparse_core alone, no ComfyUI: io.load_compressed (W4A8 kernels),
    fuse_small_ops (compiled on CUDA) and SSARAttention with the settings Sparse Sampler gives (Q)."""

    def __init__(self, path, device: str, settings):
        from dataclasses import replace

        from quantsparse_core.io.checkpoint import load_compressed
        from quantsparse_core.sparse.ssar import SSARAttention
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model, _ = load_compressed(path, device=self.device, dtype=self.dtype)
        self.model.fuse_small_ops(compile=self.device.type == "cuda")
        self.attn = self.model.attention_fn = SSARAttention(replace(settings))


def run_core_sampling(core: CoreModel, shape, cond, steps: int, last_step, seed: int, timer=None):
    """quantsparse_core's Euler sampler over the `steps`-step schedule (shift 7, guidance 6, the same conditioning
    and noise seed as ComfyUI's run), timed per step like run_sampling. Returns (seconds, whether finite)."""
    from quantsparse_core.models.sampler import flow_sigmas, sample_euler

    cuda = core.device.type == "cuda"
    timer = timer or StepTimer(cuda)
    ctx, extras = cond[0]
    dev, dt = core.device, core.dtype
    pooled = extras.get("pooled_output")
    mask = extras.get("attention_mask")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev, dt)
    # channels the model reads beyond the latent: 1.5 T2V gets zero image-latent channels and a zero mask, as
    # ComfyUI's HunyuanVideo15.concat_cond gives them when no start image is set
    extra = core.model.config.in_channels - shape[1]
    concat = torch.zeros(shape[0], extra, *shape[2:], device=dev, dtype=dt) if extra > 0 else None
    core.attn.reset()   # a new run: its statistics start at zero, so each step's share can be read off them
    counts = lambda: tuple(core.attn.stats[k] for k in ("dense", "sparse", "refresh"))  # noqa: E731
    state = {"before": None}

    def close(i, total):
        _, sparse, refresh = (a - b for a, b in zip(counts(), state["before"]))
        timer.observed.append("reuse" if sparse > 0 else "refresh" if refresh > 0 else "dense")
        timer.callback(i, None, None, total)

    def on_step(step):
        i = step.index
        if i == 0:
            timer.starts.append(timer.now())
        else:
            close(i - 1, steps)
        if last_step is not None and i >= last_step:
            raise _StopSampling
        state["before"] = counts()

    t0 = timer.now()
    try:
        with torch.inference_mode():
            out = sample_euler(core.model, noise, ctx.to(dev, dt), None if pooled is None else pooled.to(dev, dt),
                               flow_sigmas(steps).to(dev), attention_mask=None if mask is None else mask.to(dev),
                               guidance=float(extras.get("guidance", 6.0)), on_step=on_step, concat=concat)
        close(steps - 1, steps)
        finite = bool(torch.isfinite(out).all())
    except _StopSampling:
        finite = True   # the model's outputs are not seen here; the full runs check the latent
    return timer.now() - t0, finite


def sample_any(cx, model, shape, cond, steps: int, last_step, seed: int, timer=None):
    """run_sampling for a ComfyUI MODEL, run_core_sampling for (C)."""
    if isinstance(model, CoreModel):
        return run_core_sampling(model, shape, cond, steps, last_step, seed, timer)
    return run_sampling(cx, model, shape, cond, steps, last_step, seed, timer)


# ---- report ----------------------------------------------------------------------------------------
def environment(comfy_version=None) -> dict:
    versions = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                    comfyui=comfy_version, env=f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '')}")
    import importlib.metadata
    for mod, dist in (("triton", "triton"), ("comfy_kitchen", "comfy-kitchen"), ("comfy_aimdo", "comfy-aimdo")):
        try:
            versions[mod] = importlib.metadata.version(dist)
        except Exception:
            versions[mod] = getattr(sys.modules.get(mod), "__version__", "unknown")
    device = "cpu"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        device = f"{p.name} ({p.total_memory // 2 ** 20} MiB)"
        try:
            versions["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            pass
    try:
        code = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        code = "unknown"
    return dict(device=device, versions=versions, code=code)


class Report:
    def __init__(self, out: Path, data: dict):
        self.out, self.data = out, data

    def save(self):
        self.data["tables"] = tables(self.data["runs"])
        self.data["targets"] = targets(self.data["runs"], self.data.get("settings", {}).get("preset", BASE_PRESET))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.out)


def fifty_step_seconds(run):
    """The run's sampling seconds over its whole schedule: measured when every step ran; for a dense
    baseline timed over fewer steps, baseline_seconds over the schedule. None otherwise."""
    if not run.get("completed"):
        return None, None
    if len(run["per_step"]) == run["schedule_steps"]:
        return sum(s["s"] for s in run["per_step"]), None
    if run["config"] in BASELINE_CONFIGS:
        return baseline_seconds(run, run["schedule_steps"])
    return None, None


def baseline_seconds(run, steps: int):
    """A dense baseline's sampling seconds over `steps` steps: its first `steps` measured steps, and the median
    step for each one it did not run (dense steps are uniform), with a note when any was counted so."""
    per = [s["s"] for s in run["per_step"]]
    if not per:
        return None, None
    used = per[:steps]
    total = sum(used) + statistics.median(per) * (steps - len(used))
    if len(used) == steps:
        return total, None
    return total, (f"{run['config']} timed over {len(used)} of {steps} steps; the other {steps - len(used)} counted at "
                   f"the median step")


def _uncapped(runs, config, res, cut_off: bool = False):
    """Uncapped runs of `config` at `res` that completed; with cut_off also those the time limit stopped
    after some timed steps (a caller then compares only the steps both runs finished)."""
    return [r for r in runs if r["config"] == config and r["resolution"] == res and not r.get("cap_gb")
            and (r.get("completed") or (cut_off and r.get("per_step")))]


def core_target(runs) -> dict:
    """(Q) over (C) at each resolution where both ran all steps uncapped; the worst one counts."""
    name, _, _, target = CORE_TARGET
    row = dict(name=name, measured=None, target=f"<= {target}x", met=False)
    pairs = []
    for res in dict.fromkeys(r["resolution"] for r in runs if r["config"] == "C"):
        q, c = ([r for r in _uncapped(runs, cfg, res) if len(r["per_step"]) == r["schedule_steps"]] for cfg in ("Q", "C"))
        if q and c:
            pairs.append((res, fifty_step_seconds(q[-1])[0], fifty_step_seconds(c[-1])[0]))
    if not pairs:
        row["note"] = "not measured: run --configs Q,C at one resolution, all steps, uncapped"
        return row
    res, q_s, c_s = max(pairs, key=lambda p: p[1] / p[2])
    row["measured"] = round(q_s / c_s, 3)
    row["met"] = row["measured"] <= target
    row["note"] = f"(Q) {q_s:.1f} s / (C) {c_s:.1f} s at {res}" + "".join(
        f"; {r}: {a / b:.3f}" for r, a, b in pairs if r != res)
    return row


def lora_target(runs, preset: str = BASE_PRESET) -> dict:
    """(QL) against (Q), same resolution, over the steps both timed: the whole schedule where both ran it; else
    per step kind (median over median on those steps), where the worst kind counts (no step kind may cost more
    than the target), with the ratio over those steps and the schedule-weighted ratio of the kinds' medians as
    notes. A run cut off by the time limit counts for the steps it finished, and the note says so."""
    name, _, res, target = LORA_TARGET
    name = name.format(size="720p x 121" if is_v15(preset) else "720p/129f")  # what `720p` means for the preset
    row = dict(name=name, measured=None, target=f"<= {target}x", met=False)
    pairs = [(r, _uncapped(runs, "QL", r, cut_off=True), _uncapped(runs, "Q", r, cut_off=True)) for r in dict.fromkeys(
        [res] + [x["resolution"] for x in runs if x["config"] == "QL"])]
    pairs = [p for p in pairs if p[1] and p[2]]
    if not pairs:
        row["note"] = f"not measured: run --configs Q,QL --resolutions {res} (--timed-steps N for a shorter run)"
        return row
    at, ql, q = pairs[0]  # the target's resolution first
    ql, q = ql[-1], q[-1]
    n = min(len(ql["per_step"]), len(q["per_step"]))
    steps = [r["per_step"][:n] for r in (ql, q)]
    a, b = (sum(s["s"] for s in st) for st in steps)
    med_ql, med_q = ({k: v["median_s"] for k, v in kind_stats(st).items()} for st in steps)
    kinds = [k for k in ("dense", "refresh", "reuse") if k in med_ql and k in med_q]
    ratios = {k: med_ql[k] / med_q[k] for k in kinds}
    whole = n == q["schedule_steps"] and ql.get("completed") and q.get("completed")
    if whole:
        row["measured"] = round(a / b, 3)
        note = f"(QL) {a:.1f} s / (Q) {b:.1f} s, all {n} steps at {at}"
    else:
        row["measured"] = round(max(ratios.values()), 3) if ratios else None
        counts = q.get("schedule_kinds") or {}
        weighted = sum(counts[k] * med_ql[k] for k in kinds) / sum(counts[k] * med_q[k] for k in kinds) \
            if kinds and set(counts) <= set(kinds) else None
        cut = [f"({r['config']}) stopped after {len(r['per_step'])} of its {r['timed_steps']} timed steps"
               for r in (ql, q) if not r.get("completed")]
        note = (f"worst step kind of {', '.join(f'{k} {v:.3f}' for k, v in ratios.items())} (median over median, "
                f"steps 0-{n - 1}, timed in both, at {at}); (QL) {a:.1f} s / (Q) {b:.1f} s = {a / b:.3f} over those "
                f"steps" + (f"; weighted by the {q['schedule_steps']}-step schedule's kinds: {weighted:.3f}" if weighted else "")
                + "".join(f"; {c} (time limit)" for c in cut))
    complete = whole or set(ratios) == {"dense", "refresh", "reuse"}
    row["met"] = at == res and complete and row["measured"] is not None and row["measured"] <= target
    row["note"] = (note + f"; {ql.get('loras')}" + ("" if at == res else f"; not at {res}, so not the target")
                   + ("" if complete else "; not every step kind timed"))
    return row


def target_rows(runs, preset: str) -> tuple:
    """The preset family's rows; the 13B's INT8 / fp8-fast rows (its 129-frame shapes) where those configs ran."""
    if is_wan(preset):
        return WAN_TARGETS
    if is_v15(preset):
        return V15_TARGETS
    rows = TARGETS
    if any(r["config"] == "QI" for r in runs):
        rows = rows + (INT8_TARGET,)
    if any(r["config"] == "A8F" for r in runs):
        rows = rows + (FP8_FAST_TARGET,)
    if any(r["config"] == "AK" for r in runs):
        rows = rows + (CK_TARGET,)
    if any(r["config"] == "QK" for r in runs):
        rows = rows + (CK_INT8_TARGET,)
    rows = rows + tuple(t for t in FEW_STEP_TARGETS
                        if any(r["config"] == "Q" and r["schedule_steps"] == int(t[1].split(":")[3]) for r in runs))
    return rows


def targets(runs, preset: str = BASE_PRESET) -> list:
    out = []
    for name, kind, res, target in target_rows(runs, preset):
        row = dict(name=name, measured=None, target=target, met=False)
        if kind.startswith("ratio:"):
            base_cfg, cfg, steps = (kind.split(":") + ["Q", "50"][len(kind.split(":")) - 2:])[1:4]
            steps = int(steps)
            qs = [r for r in _uncapped(runs, cfg, res) if len(r["per_step"]) == r["schedule_steps"] == steps]
            bs = _uncapped(runs, base_cfg, res)
            if not qs or not bs:
                row["note"] = "not measured: needs " + " and ".join(
                    x for x, ok in ((f"a full uncapped {steps}-step ({cfg}) run at {res}", qs),
                                    (f"an uncapped ({base_cfg}) run at {res}", bs)) if not ok)
            else:
                q_s, _ = fifty_step_seconds(qs[-1])
                b_s, note = baseline_seconds(bs[-1], steps)
                row["measured"] = round(b_s / q_s, 3)
                row["met"] = row["measured"] >= target
                row["note"] = f"({base_cfg}) {b_s:.1f} s / ({cfg}) {q_s:.1f} s" + (f"; {note}" if note else "")
            row["target"] = f">= {target}x"
        elif kind.startswith("tier:"):
            cap = float(kind.split(":")[1])
            tier = [r for r in runs if r["config"] == "Q" and r["resolution"] == res and r.get("cap_gb") == cap]
            row["target"] = f"50 steps complete, capped at {cap:g} GiB"
            if not tier:
                row["note"] = f"not measured: run --configs Q --resolutions {res} --cap-gb {cap:g}"
            else:
                r = tier[-1]
                done = r.get("completed") and len(r["per_step"]) == r["schedule_steps"] == 50
                row["measured"] = round(r["peak_allocated_gb"], 2) if r.get("peak_allocated_gb") is not None else None
                row["met"] = bool(done)
                row["note"] = ("peak allocated GB (torch) with the cap" if done else
                               f"did not complete 50 steps: {r.get('error') or 'stopped'}")
        else:  # stall
            full = [r for r in runs if r.get("completed") and len(r["per_step"]) == r["schedule_steps"] >= 50]
            row["target"] = f"<= {target}x the median of the step's kind"
            if not full:
                row["note"] = "not measured: needs a completed 50-step run"
            else:
                worst = max(full, key=lambda r: r["stall"]["worst_ratio"])
                row["measured"] = round(worst["stall"]["worst_ratio"], 3)
                row["met"] = all(r["stall"]["worst_ratio"] <= target for r in full)
                row["note"] = (f"worst: {worst['label']} step {worst['stall']['worst_step']} "
                               f"({worst['stall']['worst_kind']}); over {len(full)} run(s): "
                               + ", ".join(r["label"] for r in full))
        out.append(row)
    if any(r["config"] == "QL" for r in runs):
        out.append(lora_target(runs, preset))
    if any(r["config"] == "C" for r in runs):
        out.append(core_target(runs))
    return out


def tables(runs) -> list:
    rows = []
    for r in runs:
        fifty, note = fifty_step_seconds(r)
        kinds = "; ".join(f"{k} {v['n']} x {v['median_s']:.2f} s (max {v['max_s']:.2f})"
                          for k, v in (r.get("per_kind") or {}).items())
        rows.append([r["label"], r["config"], r["resolution"], r.get("cap_gb") or "-",
                     f"{len(r['per_step'])}/{r['schedule_steps']}",
                     None if fifty is None else round(fifty, 1), kinds,
                     None if r.get("peak_allocated_gb") is None else round(r["peak_allocated_gb"], 2),
                     "yes" if r.get("completed") else f"no: {r.get('error') or r.get('skipped') or ''}"[:200],
                     note or ""])
    return [{"title": "Sampling through ComfyUI (comfy.sample.sample, euler/simple, cfg 1, guidance 6)",
             "columns": ["run", "config", "resolution", "cap GiB", "steps timed", "sampling s (schedule)",
                         "per step kind: n x median", "peak allocated GB", "completed", "note"],
             "rows": rows}]


def print_table(data):
    for t in data["tables"]:
        log("\n" + t["title"])
        log(" | ".join(t["columns"]))
        for row in t["rows"]:
            log(" | ".join("" if c is None else str(c) for c in row))
    log("\nTargets")
    for t in data["targets"]:
        log(f"  {'MET ' if t['met'] else 'not '} {t['name']}: measured {t['measured']} (target {t['target']})"
            f"{'; ' + t['note'] if t.get('note') else ''}")


def use_kitchen_attention(patcher) -> str:
    """Sets ComfyUI's "comfy kitchen attention" on the patcher as its ModelAttentionBackend node does
    (ComfyUI >= 0.33 registers it where comfy-kitchen's CUDA extension runs); RuntimeError naming what is
    missing otherwise. Returns the attention function's name."""
    import comfy.ldm.modules.attention as attention
    get = getattr(attention, "get_attention_function", None)
    if get is None or not hasattr(patcher, "set_model_optimized_attention"):
        raise RuntimeError("(AK) needs ComfyUI >= 0.33 (its attention registry and ModelAttentionBackend); this "
                         "ComfyUI has none: point COMFYUI_PATH at a newer one")
    fn = get("comfy_kitchen_int8", None)
    if fn is None:
        raise RuntimeError("ComfyUI has no comfy kitchen INT8 attention here (comfy_kitchen.int8_attention_is_available() "
                         "is false: its CUDA extension did not load, or the GPU is older than sm75)")
    patcher.set_model_optimized_attention(fn)
    return "comfy_kitchen_int8"


def check_comfy_model(patcher, preset: str, config: str) -> dict:
    """What ComfyUI built from the state dict (its detect_unet_config -> supported model -> model_base class),
    refused unless it is the preset's model and its latent format is the latent this benchmark makes (1.0 and 1.5
    share the diffusion class; a 1.5 file read as 1.0 would sample a 16-channel latent). Returns it for the run."""
    if patcher is None:
        raise RuntimeError(f"ComfyUI did not recognise ({config})'s state dict as any model")
    dm, model = type(patcher.model.diffusion_model).__name__, type(patcher.model).__name__
    want_dm, want_model = comfy_class(preset), comfy_model_class(preset)
    if dm != want_dm or want_model not in (None, model):
        raise RuntimeError(f"ComfyUI loaded ({config}) as {model}/{dm}, not {want_model or 'a'}/{want_dm} for {preset}")
    fmt = patcher.model.latent_format
    got = (fmt.latent_channels, getattr(fmt, "spacial_downscale_ratio", 8))
    if not is_wan(preset) and got != latent_geometry(preset):
        raise RuntimeError(f"ComfyUI's latent format {type(fmt).__name__} for ({config}) has (channels, downscale) "
                           f"{got}; the benchmark's latent for {preset} is {latent_geometry(preset)}")
    return dict(comfy_model=model, comfy_diffusion_model=dm,
                latent_format=dict(name=type(fmt).__name__, channels=got[0], spatial_downscale=got[1]))


# ---- budget estimates ------------------------------------------------------------------------------
def has_priors(preset: str) -> bool:
    """The full-size HunyuanVideo presets, whose runs the budget estimates (13B measured, 1.5 scaled from it) and
    whose warm-up runs at WARM_LATENT; the small test presets and Wan run unestimated."""
    return preset in (BASE_PRESET, V15_PRESET)


def step_flops(preset: str, shape, text_tokens: int) -> float:
    """A dense model call's matmul FLOPs, the part that scales between models and sizes: per block, attention
    4 N^2 H (QK^T and PV) and the linears 2 N H^2 (4 + 2 mlp_ratio) (QKV, output, MLP in and out)."""
    cfg = model_config(preset)
    n, h = video_tokens(shape, preset) + text_tokens, cfg.hidden_size
    return (cfg.depth_double + cfg.depth_single) * (4 * n * n * h + 2 * n * h * h * (4 + 2 * cfg.mlp_ratio))


def prior_steps(preset: str, res_name: str, shape, text_tokens: int) -> dict:
    """Step-time priors (s) by config / step kind for the preset at this latent: the 13B's measured rows at
    544p / 720p, other 13B sizes from 544p by video tokens^1.7 (fitted to the two measured sizes), other presets
    from the 13B's 720p by the ratio of their FLOPs per step (step_flops)."""
    if preset == BASE_PRESET:
        if res_name in PRIORS:
            return PRIORS[res_name]
        f = (video_tokens(shape) / video_tokens(latent_shape(RESOLUTIONS["544p"]))) ** 1.7
        return {k: v * f for k, v in PRIORS["544p"].items()}
    f = step_flops(preset, shape, text_tokens) / step_flops(BASE_PRESET, latent_shape(RESOLUTIONS["720p"]), text_tokens)
    return {k: v * f for k, v in PRIORS["720p"].items()}


# ---- the benchmark ---------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


class Bench:
    def __init__(self, args, comfy, report):
        self.a, self.comfy, self.report = args, comfy, report
        self.budget = Budget(args.budget_s)
        self.runs = report.data["runs"]
        self.scale = 1.0  # measured / prior step time, refined as runs finish
        from quantsparse_core.sparse.ssar import SparseSettings
        # 50 steps: the standard schedule also for the 8-step warm-up run, so that it compiles what the timed
        # run's kinds need; at most few_step_max steps: the Sparse Sampler's default ("auto": few-step) throughout
        few = args.steps <= SparseSettings().few_step_max
        self.settings = SparseSettings(schedule="auto" if few else "standard")
        self.cond, self.txt_real = conditioning(args.preset, args.text_tokens, args.seed)

    def config_settings(self, config):
        """Sparse Sampler's settings for a sparse config: (QI) turns on our INT8 dense passes, (QK) hands the
        dense passes to ComfyUI's attention (dense_attention comfyui), (QM) merges each refresh's passes."""
        from dataclasses import replace
        return replace(self.settings, int8_attention=config == "QI", host_attention=config == "QK",
                       merged_refresh=config == "QM",
                       attention_precision=getattr(self.a, "attention_precision", "bf16"))

    # -- estimates --
    def estimate(self, config, res_name, shape, timed_steps, kinds):
        if not has_priors(self.a.preset):
            return 0.0
        pri = prior_steps(self.a.preset, res_name, shape, self.a.text_tokens)
        if config in SPARSE_CONFIGS:
            s = sum(pri[k] for k in kinds[:timed_steps]) + pri["refresh"] * self.a.warm_full_steps
            if self.compact_settings(config) is not None and self.a.warm_full_steps > 0:
                s += 2 * (pri["refresh"] + pri["reuse"])
        else:
            s = pri[config] * (timed_steps + 1)
        return s * self.scale * (1.3 if self.a.cap_gb else 1.0)

    def baseline_steps(self, res_name):
        spec = self.a.baseline_steps
        if not spec:
            return self.a.steps
        for part in spec.split(","):
            if "=" in part:
                k, v = part.split("=")
                if k.strip() == res_name:
                    return min(self.a.steps, int(v))
            elif part.strip():
                return min(self.a.steps, int(part))
        return self.a.steps

    # -- models --
    def load(self, config):
        comfy, dev = self.comfy, self.a.device
        t0 = time.perf_counter()
        with torch.inference_mode():
            if config in BASELINE_CONFIGS:
                sd = random_state_dict(self.a.preset, dev, self.a.seed)
                # as UNETLoader's weight_dtype fp8_e4m3fn / fp8_e4m3fn_fast sets them
                opts = {"dtype": torch.float8_e4m3fn} if config in ("A8", "A8F") else {}
                if config == "A8F":
                    opts["fp8_optimizations"] = True
                import comfy.sd
                patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts)
                del sd
                info = {}
                if config == "AK":
                    info["attention"] = use_kitchen_attention(patcher)
            else:
                path = Path(self.a.ckpt or f"/tmp/quantsparse_bench_{self.a.preset}_w4a8_rtn_seed{self.a.seed}.safetensors")
                info = {"checkpoint": str(path)}
                if not path.is_file():
                    tb = time.perf_counter()
                    with torch.inference_mode(False):
                        info["storage"] = build_compressed(self.a.preset, path, dev, self.a.seed)
                    info["build_s"] = round(time.perf_counter() - tb, 1)
                info["checkpoint_gb"] = round(path.stat().st_size / 1e9, 2)
                if config == "C":
                    with torch.inference_mode(False):
                        core = CoreModel(path, dev, self.config_settings(config))
                    info["fused_blocks"] = "core fuse_small_ops"
                    info["load_s"] = round(time.perf_counter() - t0, 1)
                    return core, info
                patcher = comfy.load_compressed_dit(path)
                if config == "QK":  # a Model Attention Backend node before the Sparse Sampler
                    info["attention"] = use_kitchen_attention(patcher)
                if config == "QL":
                    patcher, info["loras"] = add_random_loras(patcher, self.a.loras, self.a.lora_rank, dev, self.a.seed)
                patcher = comfy.sparse_patch.apply_sparse(patcher, self.config_settings(config))  # Sparse Sampler's defaults
                info["fused_blocks"] = comfy.fused_blocks is not None and comfy.fused_blocks.is_fused(patcher)
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        info["load_s"] = round(time.perf_counter() - t0, 1)
        info.update(check_comfy_model(patcher, self.a.preset, config))
        return patcher, info

    # -- runs --
    def run_config(self, config, res_names):
        plans = []
        for res_name in res_names:
            res = parse_resolution(res_name, self.a.preset)
            shape = latent_shape(res, self.a.preset)
            coarse, fine = step_kinds(self.settings, self.a.steps) if config in SPARSE_CONFIGS else \
                (["dense"] * self.a.steps, ["dense"] * self.a.steps)
            timed = self.a.steps if config in SPARSE_CONFIGS else self.baseline_steps(res_name)
            if self.a.timed_steps:
                timed = min(timed, self.a.timed_steps)
            plans.append((res_name, res, shape, coarse, fine, timed))
        need = LOAD_PRIOR_S[config] * has_priors(self.a.preset)
        fits = []
        for p in plans:
            est = self.estimate(config, p[0], p[2], p[5], p[3])
            if need + est > self.budget.left():
                self.skip(config, p, f"skipped: estimated {need + est:.0f} s, {self.budget.left():.0f} s of --budget-s left")
            else:
                fits.append(p)
                need += est
        if not fits:
            return
        log(f"== ({config}) {CONFIG_NAMES[config]}: loading")
        try:
            patcher, info = self.load(config)
        except Exception as e:
            traceback.print_exc()
            for p in fits:
                self.skip(config, p, f"load failed: {type(e).__name__}: {str(e)[:300]}", error=True)
            self.comfy.free()
            return
        log(f"   loaded in {info['load_s']} s {info}")
        first = True
        for p in fits:
            res_name, res, shape, coarse, fine, timed = p
            est = self.estimate(config, res_name, shape, timed, coarse)
            if est > self.budget.left():
                self.skip(config, p, f"skipped: estimated {est:.0f} s, {self.budget.left():.0f} s left")
                continue
            warm = None
            if not self.a.no_warm_run:
                warm = self.warm(patcher, config, shape, first)
                first = False
            self.timed(config, patcher, info, p, warm)
        del patcher
        self.comfy.free()

    def warm(self, patcher, config, shape, first: bool) -> dict:
        """Untimed sampling before the timed run: once per model a tiny 8-step run (loads the model,
        compiles the kernels of every step kind); for (Q) also --warm-full-steps steps at the timed
        latent (torch.compile and the GEMM autotuner specialise on the real shapes)."""
        out, t0 = {}, time.perf_counter()
        jobs, compiles = [], []
        if first:
            f, h, w = WARM_LATENT if has_priors(self.a.preset) else (9, 128, 128)
            jobs.append((latent_shape((w, h, f), self.a.preset), WARM_STEPS, None,
                         f"{WARM_STEPS} steps at {w}x{h}x{f}"))
        if config in SPARSE_CONFIGS and self.a.warm_full_steps > 0:
            jobs.append((shape, self.a.steps, self.a.warm_full_steps,
                         f"{self.a.warm_full_steps} step(s) at the timed latent"))
            compact = self.compact_settings(config)
            if compact is not None:
                jobs.append((shape, self.a.steps, COMPACT_WARM_STEPS,
                             f"{COMPACT_WARM_STEPS} steps at the timed latent on a compact schedule (refresh, reuse, "
                             f"refresh, second-order reuse)", compact))
        for wshape, steps, last, what, *settings in jobs:
            t1 = time.perf_counter()
            timer = StepTimer(self.a.device == "cuda")
            model = self.comfy.sparse_patch.apply_sparse(patcher, settings[0]) if settings else patcher
            try:
                sample_any(self.comfy, model, wshape, self.cond, steps, last, self.a.seed, timer=timer)
            except Exception as e:
                traceback.print_exc()
                out["warm_error"] = f"{what}: {type(e).__name__}: {str(e)[:300]}"
                break
            finally:
                compiles.append(dict(job=what, kinds=list(timer.observed),
                                     **warm_compiles(timer.events + [timer.trace.take()])))
                if settings:  # its run closed its masks and cache as it ended: free them before the timed run places its own
                    del model
                    gc.collect()
                    if self.a.device == "cuda":
                        torch.cuda.empty_cache()
            log(f"   warm-up, {what}: {time.perf_counter() - t1:.1f} s")
        out["warm_s"] = round(time.perf_counter() - t0, 1)
        out["warm"] = [j[3] for j in jobs]
        out["warm_jobs"] = compiles  # per job: the step kinds SSAR ran, the Triton compiles and what made them new
        return out

    def compact_settings(self, config):
        """Settings for the extra warm-up of a standard-schedule (Q)-like config: no dense warm-up steps and a
        refresh every 2nd step, so steps 0-3 at the timed latent run each step kind the timed schedule reaches
        only at steps 5, 6, 10 and 11 (the first reuse and first second-order reuse compiled kernel variants
        there, 3-4 s each at 720p, after a warm-up that had covered the dense steps only). None where the
        schedule is not the standard one (few-step runs reach their kinds at steps 0-1) or for (C)."""
        if getattr(self.a, "no_compact_warm", False) or config == "C":
            return None
        from dataclasses import replace
        settings = self.config_settings(config)
        if settings.resolved_schedule(self.a.steps) != "standard" or settings.order < 1:
            return None
        return replace(settings, warmup_steps=0, tau=2)

    def skip(self, config, plan, why, error=False):
        res_name, res, shape, coarse, fine, timed = plan
        log(f"   ({config}) {res_name}: {why}")
        self.runs.append(dict(label=f"{config}@{res_name}" + (f"/{self.a.cap_gb:g}GiB" if self.a.cap_gb else ""),
                              config=config, resolution=res_name, cap_gb=self.a.cap_gb, schedule_steps=self.a.steps,
                              per_step=[], completed=False, skipped=None if error else why,
                              error=why if error else None))
        self.report.save()

    def timed(self, config, patcher, info, plan, warm):
        res_name, res, shape, coarse, fine, timed = plan
        label = f"{config}@{res_name}" + (f"/{self.a.cap_gb:g}GiB" if self.a.cap_gb else "")
        run = dict(label=label, config=config, name=CONFIG_NAMES[config], resolution=res_name,
                   pixels=dict(width=res[0], height=res[1], frames=res[2]), latent=list(shape),
                   tokens=video_tokens(shape, self.a.preset) + (0 if is_wan(self.a.preset) else self.a.text_tokens),
                   text_tokens=self.a.text_tokens,
                   text_real_tokens=self.txt_real, cap_gb=self.a.cap_gb, schedule_steps=self.a.steps,
                   schedule_kinds=dict(collections.Counter(coarse)),
                   timed_steps=timed, completed=False, per_step=[], **info, **(warm or {}))
        if config in SPARSE_CONFIGS:
            run["sparse_settings"] = asdict(self.config_settings(config))
        self.runs.append(run)
        cuda = self.a.device == "cuda"
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run["comfy_view"] = self.comfy.view()
        log(f"== {label}: {timed} of {self.a.steps} steps, latent {shape}, {run['tokens']:,} tokens; ComfyUI sees "
            f"{run['comfy_view']}")
        captured = _capture_log("quantsparse")
        timer_ref = {}
        profiling = self.a.memory_profile and memory_peak.start()
        profile_steps = getattr(self.a, "profile_steps", None)
        steps_profiled = StepProfiler(profile_steps, cuda) if profile_steps else None
        if profile_steps:
            run["profiled_steps"] = sorted(profile_steps)  # their times include the profiler's overhead

        def on_step(i, total):
            if steps_profiled is not None:
                steps_profiled.end(i)
                steps_profiled.begin(i + 1)
            t = timer_ref.get("t")
            if t is None or i >= len(t.ends):
                return
            begin = t.ends[i - 1] if i else t.starts[0]
            ev = t.events[i] if i < len(t.events) else {}
            busy = {k: v for k, v in ev.items() if v and k != "triton_kernels"}
            log(f"   step {i:2d} [{coarse[i]:7s}] {t.ends[i] - begin:7.2f} s" + (f"  {busy} {ev.get('triton_kernels', '')}"
                                                                              if busy else ""))
            # Saved every step (a few ms, counted in the next step): a run stopped by a time limit keeps its steps.
            run["per_step"] = [dict(s, kind=coarse[s["i"]], fine_kind=fine[s["i"]]) for s in t.steps()]
            self.report.save()

        if steps_profiled is not None:
            steps_profiled.begin(0)
        fused = getattr(self.comfy.fused_blocks, "counts", None) if self.comfy is not None else None
        fused_before = dict(fused) if fused is not None else None
        try:
            timer, total_s, finite = self._sample(patcher, shape, timed, on_step, timer_ref)
            run["completed"] = True
            run["output_finite"] = finite
            run["sample_call_s"] = round(total_s, 2)
        except Exception as e:
            traceback.print_exc()
            timer = timer_ref.get("t")
            run["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        finally:
            captured.close()
            if fused is not None:  # block calls of the timed run: fused per kind, and why any ran ComfyUI's code
                run["fused_block_calls"] = {k: v - fused_before.get(k, 0) for k, v in fused.items()
                                            if v != fused_before.get(k, 0)}
            if steps_profiled is not None:
                steps_profiled.close()
                run["step_profiles"] = steps_profiled.summaries()
                for i, p in run["step_profiles"].items():
                    log(f"   profile step {i}: wall {p['wall_s']} s, device busy {p['device_busy_fraction']}, "
                        f"syncs {p['syncs']}; top {[(r['op'][:40], r['device_ms']) for r in p['top'][:5]]}")
            if profiling:
                run["memory_peak"] = memory_peak.stop_and_summarize()
                for g in run["memory_peak"]["groups"][:15]:
                    log(f"   peak holder {g['gb']:7.3f} GB x{g['count']:<4d} {g['site']}")
        if timer is not None:
            steps = timer.steps()
            for s in steps:
                s["kind"], s["fine_kind"] = coarse[s["i"]], fine[s["i"]]
            run["per_step"] = steps
            run["sampling_s"] = round(sum(s["s"] for s in steps), 2)
            if config in SPARSE_CONFIGS:
                mism = [s["i"] for s in steps if s["observed"] is not None and s["observed"] != s["kind"]]
                run["kinds_match_schedule"] = not mism and all(s["observed"] for s in steps)
                run["kind_mismatches"] = mism
            run["per_kind"] = kind_stats(steps)
            if steps:
                worst = max(steps, key=lambda s: s["s"] / run["per_kind"][s["kind"]]["median_s"])
                ratio = worst["s"] / run["per_kind"][worst["kind"]]["median_s"]
                run["stall"] = dict(worst_ratio=ratio, worst_step=worst["i"], worst_kind=worst["kind"],
                                    steps_over=[s["i"] for s in steps
                                                if s["s"] > STALL_RATIO * run["per_kind"][s["kind"]]["median_s"]])
        run["sparse_log"] = captured.lines
        if cuda:
            run["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
            run["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        fifty, note = fifty_step_seconds(run)
        run["schedule_s"] = None if fifty is None else round(fifty, 2)
        if note:
            run["note"] = note
        if run["completed"] and has_priors(self.a.preset) and run["per_step"]:
            pri = prior_steps(self.a.preset, res_name, shape, self.a.text_tokens)
            exp = sum(pri[config] if config not in SPARSE_CONFIGS else pri[s["kind"]] for s in run["per_step"])
            self.scale = max(0.5, min(3.0, run["sampling_s"] / exp))
        log(f"   {label}: {'completed' if run['completed'] else 'FAILED ' + str(run.get('error'))}; sampling "
            f"{run.get('sampling_s')} s over {len(run['per_step'])} steps; schedule {run['schedule_s']} s; "
            f"peak {run.get('peak_allocated_gb', 0):.2f} GB; kinds {run.get('per_kind')}")
        self.report.save()

    def _sample(self, patcher, shape, timed, on_step, timer_ref):
        timer = timer_ref["t"] = StepTimer(self.a.device == "cuda", on_step)
        last = None if timed >= self.a.steps else timed
        total_s, finite = sample_any(self.comfy, patcher, shape, self.cond, self.a.steps, last, self.a.seed, timer)
        return timer, total_s, finite

    def rope_diagnostic(self, res_names):
        """ComfyUI's RoPE as it runs here (comfy_kitchen's selected backend), per step (every block)."""
        if self.a.device != "cuda" or not has_priors(self.a.preset):
            return
        from comfy.ldm.flux.math import apply_rope
        cfg = model_config(self.a.preset)
        blocks = cfg.depth_double + cfg.depth_single
        diag = self.report.data.setdefault("diagnostics", {})
        for res_name in res_names:
            shape = latent_shape(parse_resolution(res_name, self.a.preset), self.a.preset)
            n = video_tokens(shape, self.a.preset) + self.a.text_tokens
            q = torch.randn(1, cfg.num_heads, n, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn_like(q)
            pe = torch.randn(1, 1, n, cfg.head_dim // 2, 2, 2, device="cuda", dtype=torch.float32)
            with torch.inference_mode():
                for _ in range(2):
                    apply_rope(q, k, pe)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    apply_rope(q, k, pe)
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / 5 * 1e3
            diag[f"rope_{res_name}"] = {"ms_per_call": round(ms, 2),  # the 13B's key stays s_per_step_60_blocks
                                        f"s_per_step_{blocks}_blocks": round(ms * blocks / 1e3, 2),
                                        "backends": self.comfy.view().get("kitchen_backends")}
            log(f"   RoPE (ComfyUI -> comfy_kitchen) at {res_name}: {ms:.1f} ms per block, "
                f"{ms * blocks / 1e3:.2f} s per step ({blocks} blocks)")
            del q, k, pe
            torch.cuda.empty_cache()


class _capture_log(logging.Handler):
    """Collect one logger's INFO lines (the sparse patch's per-run summary) while a run lasts."""

    def __init__(self, name):
        super().__init__(logging.INFO)
        self.lines, self.logger = [], logging.getLogger(name)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record):
        self.lines.append(record.getMessage()[:500])

    def close(self):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)
        super().close()


def merge(paths, out):
    """Targets over the runs of several result files (e.g. the capped tiers run as separate processes)."""
    runs, sources, first = [], [], None
    for p in paths:
        d = json.loads(Path(p).read_text())
        first = first or d
        sources.append(dict(file=str(p), command=d.get("command"), date=d.get("date")))
        for r in d.get("runs", []):
            runs.append(dict(r, source=Path(p).name))
    data = dict(first, run="product (merged)", command="comfy_product.py --merge " + " ".join(map(str, paths)),
                sources=sources, runs=runs)
    rep = Report(Path(out), data)
    rep.save()
    print_table(rep.data)
    log(f"\nwrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="A,A8,Q", help="comma list of A, A8, A8F (fp8_e4m3fn_fast), AK (comfy kitchen INT8 "
                                                        "attention, ComfyUI >= 0.33), Q, C (Q's checkpoint "
                                                        "by quantsparse_core alone), QI (Q + INT8 dense passes), QK (Q + "
                                                        "dense passes on ComfyUI's kitchen INT8 attention), QL "
                                                        "(Q + --loras stacked LoRAs), QM (Q + merged refreshes)")
    ap.add_argument("--loras", type=int, default=3, help="(QL): how many random LoRAs to stack")
    ap.add_argument("--attention-precision", default="bf16", choices=("bf16", "int8", "int8-fp8"),
                    help="the sparse configs' SparseSettings.attention_precision (every attention pass of the run on "
                         "the quantised block-sparse kernel; bf16 = the Sparse Sampler's default)")
    ap.add_argument("--lora-rank", type=int, default=32, help="(QL): their rank (on every linear of every block)")
    ap.add_argument("--resolutions", default="544p,720p",
                    help="comma list of 544p, 720p (x129; x121 for HunyuanVideo 1.5 presets), 480p (1.5: 848x480x121), "
                         "wan720p, wan480p or WIDTHxHEIGHTxFRAMES")
    ap.add_argument("--steps", type=int, default=50,
                    help="sampling steps (the schedule); default 50. At 8 or fewer, (Q) runs the Sparse Sampler's "
                         "few-step schedule (its default there) and issue 20's 4/8-step rows are reported")
    ap.add_argument("--baseline-steps", default="",
                    help="time (A)/(A8) over only the first N steps of the schedule: N, or RES=N,... "
                         "(dense steps are uniform); e.g. 720p=3")
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="cap this process like a card of this many GiB (allocator fraction + what ComfyUI sees)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="skip runs estimated not to fit, and say so")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/<date>_product_<slug>.json)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(ROOT / ".devcarry" / "ComfyUI")),
                    help="ComfyUI checkout (default $COMFYUI_PATH, else .devcarry/ComfyUI)")
    ap.add_argument("--preset", default=BASE_PRESET, help="quantsparse_core model preset: hunyuan-video-13b, "
                                                          "hunyuan-video-1.5-8b, Wan presets (tests: test, test-1.5, "
                                                          "wan-test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 256; Wan presets 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt", default=None, help="compressed checkpoint path for (Q) (built there if missing)")
    ap.add_argument("--no-warm-run", action="store_true", help="skip the untimed warm-up sampling before timing")
    ap.add_argument("--warm-full-steps", type=int, default=1,
                    help="(Q): untimed steps at the timed latent before the timed run (compile/autotune at real shapes)")
    ap.add_argument("--profile-steps", type=lambda t: [int(x) for x in t.split(",") if x.strip()], default=[],
                    help="comma list of step indices to run under torch.profiler (runs[].step_profiles: top operators, "
                         "host syncs, device busy fraction); those steps' times include the profiler's overhead")
    ap.add_argument("--kernel-lazy", action="store_true",
                    help="the attention kernels' lazy rescaling on (sparse_attention.LAZY, int8_attention.LAZY; off by "
                         "default until measured)")
    ap.add_argument("--no-compact-warm", action="store_true",
                    help="(Q) on the standard schedule: skip the warm-up's 4 compact-schedule steps at the timed latent "
                         "(refresh, reuse, refresh, second-order reuse), which compile every step kind's kernels")
    ap.add_argument("--timed-steps", type=int, default=0,
                    help="stop every config after this many steps of the schedule (diagnostics; 0: all)")
    ap.add_argument("--memory-profile", action="store_true",
                    help="record the allocator during the timed runs and list what is alive at the peak "
                         "(slows host-side work: not for timing)")
    ap.add_argument("--merge", nargs="+", default=None, help="result JSONs to merge into --out (no GPU needed)")
    args = ap.parse_args(argv)
    if args.text_tokens is None:
        args.text_tokens = 512 if is_wan(args.preset) else 256
    if args.merge:
        if not args.out:
            sys.exit("--merge needs --out")
        merge(args.merge, args.out)
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        sys.exit(f"unknown config(s) {bad}; choose from {CONFIGS}")
    res_names = [r.strip() for r in args.resolutions.split(",") if r.strip()]
    for r in res_names:
        parse_resolution(r, args.preset)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or --device cpu --preset test for a dry run")
    now = datetime.datetime.now(datetime.timezone.utc)
    slug = "-".join(configs) + "_" + "-".join(res_names) + (f"_cap{args.cap_gb:g}" if args.cap_gb else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{now:%Y-%m-%d}_product_{slug}.json")
    comfy = Comfy(args.comfyui, args.device, args.cap_gb)
    if args.kernel_lazy:
        set_kernel_lazy(True)
    env = environment(comfy.version)
    cmd = "python benchmarks/comfy_product.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data = dict(run=f"product: {slug}", date=f"{now:%Y-%m-%d}", time_utc=f"{now:%H:%M}", **env, command=cmd,
                comfyui=dict(version=comfy.version, path=str(comfy.path), in_process=True,
                             dynamic_vram="off (main.py not run: legacy ModelPatcher)", kitchen_cuda=comfy.kitchen_cuda,
                             **comfy.view()),
                settings=dict(preset=args.preset, steps=args.steps, sampler="euler", scheduler="simple", cfg=1.0,
                              guidance=None if is_v15(args.preset) else 6.0, text_tokens=args.text_tokens,
                              cap_gb=args.cap_gb,
                              cap_allocator_bytes=comfy.cap_bytes, seed=args.seed, warm_run=not args.no_warm_run,
                              kernel_lazy=args.kernel_lazy),
                runs=[], notes=[
                    "Headline: wall-clock of the sampling steps (first model call to the last step's end, "
                    "device-synchronized), ComfyUI's comfy.sample.sample, model already loaded by a warm-up run.",
                    "ComfyUI's RoPE runs on comfy_kitchen's selected backend (comfyui.kitchen_backends; its CUDA "
                    "extension travels xz-compressed, comfyui.kitchen_cuda); it costs (A) and (A8) "
                    "diagnostics.rope_* per step, while (Q)'s fused blocks apply RoPE in their own kernel.",
                ])
    report = Report(out, data)
    report.save()
    log(f"ComfyUI {comfy.version} in-process from {comfy.path}; {env['device']}; {env['versions']}")
    log(f"ComfyUI sees: {comfy.view()}")
    bench = Bench(args, comfy, report)
    compile_log()  # from the first kernel on: a timed step's compile is compared with the warm-up's
    order = [c for c in CONFIGS if c in configs]
    for config in order:
        try:
            bench.run_config(config, res_names)
        except Exception as e:
            traceback.print_exc()
            data["notes"].append(f"({config}) raised {type(e).__name__}: {str(e)[:300]}")
            comfy.free()
        report.save()
    try:
        bench.rope_diagnostic(res_names)
    except Exception as e:
        data["notes"].append(f"RoPE diagnostic raised {type(e).__name__}: {e}")
    report.save()
    print_table(report.data)
    log(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The compressed checkpoint: one .safetensors file with packed integer weights, per-channel
scales, the online activation transforms, every other tensor in bf16, and a JSON header that says
how to rebuild the model. The layout is specified in docs/FORMAT.md.

The loader checks the header and every key, shape and dtype before it allocates anything, then
every stored value that can be out of range (non-finite floats, clip factors, scales), so a wrong or
damaged file fails in one clear CheckpointError instead of half-way through a 13B load or as a NaN
video. tests/test_checkpoint_fuzz.py mutates files to hold it to that.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..models.config import I2V, T2V, V15, DiTConfig
from ..models.family import FAMILIES, HUNYUAN_VIDEO, family_of
from ..models.wan import WAN_VARIANTS, WanConfig
from ..models.weights import atomic_save_safetensors
from ..quant.linear import QuantLinear
from ..quant.policy import policy_from_json, policy_to_json
from ..quant.transforms import kron_factors

FORMAT_NAME = "quantsparse-compressed"
FORMAT_VERSION = 1
HEADER_KEY = "quantsparse"
ROTATIONS = (None, "hadamard", "learned")
LAYER_FIELDS = {"w_bits", "a_bits", "smooth", "rotation"}  # a header 'layers' entry holds exactly these

# The variants a compressed file may hold (config.variant; models/family.py says which family each is in):
# each runs in our DiT and loads as ComfyUI's matching model (HunyuanVideo / HunyuanVideoI2V / HunyuanVideo15,
# or WanModel). The rest of ComfyUI's HunyuanVideo family (SkyReels I2V, the 1.5 super-resolution model,
# HunyuanImage 2.1 and its refiner) and of its Wan-based models (VACE, Fun, S2V, ...) is neither written nor read.
LOADABLE = (T2V, I2V, V15, *WAN_VARIANTS)
LOADABLE_TEXT = ("HunyuanVideo 1.0 T2V, HunyuanVideo 1.0 I2V, HunyuanVideo 1.5 (T2V and I2V), "
                 + ", ".join(WAN_VARIANTS))
MAX_WIDTH = 1 << 16  # no DiT layer is this wide; bounds what a forged Wan header can ask the meta model for

MAX_BLOCKS = 4096  # far above any DiT; bounds the meta model a forged header could ask for
MAX_ABS = 1e4      # no trained DiT stores a weight, bias, norm or scale this large: a flipped exponent bit does
ORTHO_TOL = 1e-3   # stored rotation factors are orthogonal to ~1e-6 in fp32


class CheckpointError(ValueError):
    """A compressed checkpoint that cannot be used: foreign, damaged, edited or out of range. The
    message names the problem and what to do."""


# safetensors dtype names, as reported by get_slice().get_dtype()
_ST_DTYPE = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.bfloat16: "BF16"}


# -- what a layer stores ------------------------------------------------------------------------------

def _quant_specs(name: str, out_f: int, in_f: int, has_bias: bool, info: dict) -> dict:
    """{key: (shape, torch dtype)} of the tensors one quantized linear stores."""
    w_bits, a_bits = info["w_bits"], info["a_bits"]
    specs = {f"{name}.weight_packed": ((out_f, in_f // 2), torch.uint8) if w_bits == 4
             else ((out_f, in_f), torch.int8),
             f"{name}.weight_scale": ((out_f, 1), torch.float32)}
    if has_bias:
        specs[f"{name}.bias"] = ((out_f,), torch.bfloat16)
    if a_bits < 16:
        specs[f"{name}.act_clip"] = ((), torch.float32)
    if info["smooth"]:
        specs[f"{name}.smooth"] = ((in_f,), torch.float32)
    if info["rotation"]:
        n1, n2 = kron_factors(in_f)
        specs[f"{name}.rot1"] = ((n1, n1), torch.float32)
        specs[f"{name}.rot2"] = ((n2, n2), torch.float32)
    return specs


def _quant_tensors(name: str, q: QuantLinear) -> dict:
    return {f"{name}.{leaf}": t for leaf, t in q.packed_tensors().items()}


# -- save ---------------------------------------------------------------------------------------------

def save_compressed(model: nn.Module, path, policy: dict, *, calibration: dict | None = None,
                    source_hash: str | None = None) -> None:
    """Write `model` (a HunyuanVideoDiT or WanDiT whose policy's linears are QuantLinear) as one compressed
    .safetensors file.

    Layers still in fake mode are frozen on a copy, so the caller's model is left unchanged.
    The write is atomic: on any failure no file (and no temporary file) is left behind.
    """
    try:
        family = family_of(model)
        require_loadable(model.config)
    except (CheckpointError, ValueError) as e:
        raise ValueError(f"cannot save a compressed checkpoint: {e}") from None
    named = dict(model.named_modules())
    quant_names = {n for n, m in named.items() if isinstance(m, QuantLinear)}
    if quant_names != set(policy):
        raise ValueError(f"the model's quantized linears do not match the policy: not in policy "
                         f"{sorted(quant_names - set(policy))[:3]}, not quantized {sorted(set(policy) - quant_names)[:3]}")
    tensors, layers = {}, {}
    for name, rule in policy.items():
        q = named[name]
        if (q.w_bits, q.a_bits) != (rule.w_bits, rule.a_bits):
            raise ValueError(f"{name} is W{q.w_bits}A{q.a_bits} but the policy says W{rule.w_bits}A{rule.a_bits}")
        if q.mode != "real":
            q = copy.deepcopy(q).freeze()
        tensors.update(_quant_tensors(name, q))
        layers[name] = {"w_bits": q.w_bits, "a_bits": q.a_bits, "smooth": q.log_smooth is not None,
                        "rotation": q.rotation}
    prefixes = tuple(n + "." for n in policy)
    for k, v in model.state_dict().items():
        if not k.startswith(prefixes):
            tensors[k] = v.detach().to(torch.bfloat16).cpu()
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "model_family": family.name,
              "config": model.config.to_dict(), "policy": policy_to_json(policy), "layers": layers,
              "calibration": calibration or {}, "source_hash": source_hash}
    atomic_save_safetensors(tensors, path, metadata={HEADER_KEY: json.dumps(header)})


# -- validate -----------------------------------------------------------------------------------------

def _read_index(path: Path):
    """(metadata, {key: (shape, dtype name)}) without loading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            index = {}
            for k in f.keys():
                s = f.get_slice(k)
                index[k] = (tuple(s.get_shape()), s.get_dtype())
    except Exception as e:  # safetensors raises several types for corrupt or truncated files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-create it") from e
    return meta, index


def _parse_header(path: Path, meta: dict):
    not_ours = (f"{path} is not a QuantSparse compressed checkpoint (it has no '{FORMAT_NAME}' header); "
                "quantize a HunyuanVideo or Wan model with QuantSparse to create one")
    if HEADER_KEY not in meta:
        raise CheckpointError(not_ours)
    try:
        h = json.loads(meta[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has a corrupt QuantSparse header ({e}); re-create the file") from None
    if not isinstance(h, dict) or h.get("format") != FORMAT_NAME:
        raise CheckpointError(not_ours)
    if h.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by format version {h.get('version')}; this QuantSparse reads "
                         f"version {FORMAT_VERSION}: update QuantSparse")
    family = FAMILIES.get(h.get("model_family")) if isinstance(h.get("model_family"), str) else None
    if family is None:
        raise CheckpointError(f"{path} holds a {h.get('model_family')!r} model; QuantSparse loads "
                              f"{' and '.join(repr(n) for n in FAMILIES)} checkpoints only")
    try:
        if not isinstance(h["config"], dict):
            raise TypeError("the config must be an object")
        config = family.config_type.from_dict(h["config"])
        (_check_config if family is HUNYUAN_VIDEO else _check_wan_config)(config)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:  # e.g. num_heads 0
        raise CheckpointError(f"{path} has an invalid model config in its header: {e}") from None
    try:
        require_loadable(config)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(h.get("policy"), dict) or not isinstance(h.get("layers"), dict):
        raise CheckpointError(f"{path} header lacks the 'policy' and 'layers' tables; re-create the file")
    if not all(isinstance(r, dict) for r in h["policy"].values()):
        raise CheckpointError(f"{path} has an invalid layer policy in its header (entries must be objects); "
                              "re-create the file")
    try:
        policy = policy_from_json(h["policy"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return h, config, policy


def require_loadable(config) -> str:
    """The config's variant, or a CheckpointError naming it and the variants the format holds."""
    variant = config.variant
    if variant not in LOADABLE:
        raise CheckpointError(f"the model is {variant}; QuantSparse compressed checkpoints hold {LOADABLE_TEXT} "
                              "transformers only")
    return variant


def _check_config(config: DiTConfig) -> None:
    """Field types and sizes a real DiT can have, before a meta model is built from them."""
    ints = ("hidden_size", "num_heads", "depth_double", "depth_single", "in_channels", "out_channels",
            "context_in_dim", "rope_theta", "refiner_blocks")
    for name in ints:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if config.depth_double + config.depth_single + config.refiner_blocks > MAX_BLOCKS:
        raise ValueError(f"{config.depth_double + config.depth_single + config.refiner_blocks} blocks is more "
                         f"than any DiT has ({MAX_BLOCKS})")
    if len(config.patch_size) == 2 and all(isinstance(q, int) for q in config.patch_size):
        raise ValueError(f"patch_size {list(config.patch_size)} is an image model's 2-D patch (HunyuanImage 2.1), "
                         "which QuantSparse does not support")
    if not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in config.patch_size) \
            or len(config.patch_size) != 3:
        raise ValueError(f"patch_size must be three positive integers, got {config.patch_size!r}")
    if not isinstance(config.mlp_ratio, (int, float)) or not math.isfinite(config.mlp_ratio) or config.mlp_ratio <= 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {config.mlp_ratio!r}")
    if config.vec_in_dim is not None and (not isinstance(config.vec_in_dim, int) or config.vec_in_dim <= 0):
        raise ValueError(f"vec_in_dim must be a positive integer or null, got {config.vec_in_dim!r}")
    for name in ("guidance_embed", "cond_type_embedding", "meanflow"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    for name in ("byt5_in_dim", "vision_in_dim"):  # HunyuanVideo 1.5's token inputs: absent (null) or a width
        v = getattr(config, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be a positive integer or null, got {v!r}")
    if isinstance(config.byt5_hidden, bool) or not isinstance(config.byt5_hidden, int) or config.byt5_hidden <= 0:
        raise ValueError(f"byt5_hidden must be a positive integer, got {config.byt5_hidden!r}")


def _check_wan_config(config: WanConfig) -> None:
    """Field types and sizes a real Wan transformer can have (WanConfig checks the head split and patch)."""
    for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_WIDTH:
            raise ValueError(f"{name} must be an integer in 1..{MAX_WIDTH}, got {v!r}")
    if config.num_layers > MAX_BLOCKS:
        raise ValueError(f"{config.num_layers} blocks is more than any DiT has ({MAX_BLOCKS})")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p <= 16 for p in config.patch_size):
        raise ValueError(f"patch_size must be three integers in 1..16, got {list(config.patch_size)!r}")
    for name in ("eps", "rope_theta"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    n = config.flf_pos_embed_token_number
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_WIDTH):
        raise ValueError(f"flf_pos_embed_token_number must be a positive integer or null, got {n!r}")


def _expected(path: Path, header: dict, config, policy: dict) -> dict:
    """{key: (shape, dtype)} the file must hold, from a meta-device model plus the header's layers."""
    try:
        meta_model = family_of(config).build(config, device="meta")
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path} header describes a {config.variant} model that cannot be built ({e}); "
                              "re-create the file") from None
    named = dict(meta_model.named_modules())
    layers = header["layers"]
    if set(layers) != set(policy):
        raise CheckpointError(f"{path} header: 'layers' and 'policy' name different linears; re-create the file")
    specs = {}
    for name, rule in policy.items():
        lin, info = named.get(name), layers[name]
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{path} header: policy names {name!r}, which is not a linear layer of this model")
        ok = (isinstance(info, dict) and set(info) == LAYER_FIELDS
              and info.get("w_bits") == rule.w_bits and info.get("a_bits") == rule.a_bits
              and isinstance(info.get("smooth"), bool) and info.get("rotation") in ROTATIONS)
        if not ok:
            raise CheckpointError(f"{path} header: layer entry for {name!r} is invalid or disagrees with the policy: {info}")
        specs.update(_quant_specs(name, lin.out_features, lin.in_features, lin.bias is not None, info))
    prefixes = tuple(n + "." for n in policy)
    for k, v in meta_model.state_dict().items():
        if not k.startswith(prefixes):
            specs[k] = (tuple(v.shape), torch.bfloat16)
    return specs


def _check_keys(path: Path, index: dict, specs: dict, variant: str) -> None:
    missing = sorted(set(specs) - set(index))
    extra = sorted(set(index) - set(specs))
    shapes = [f"{k}: file {list(index[k][0])} vs expected {list(specs[k][0])}"
              for k in sorted(specs) if k in index and index[k][0] != tuple(specs[k][0])]
    dtypes = [f"{k}: file {index[k][1]} vs expected {_ST_DTYPE[specs[k][1]]}"
              for k in sorted(specs) if k in index and index[k][1] != _ST_DTYPE[specs[k][1]]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra),
                         ("wrong shapes", shapes), ("wrong dtypes", dtypes)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {items[:3]})")
    if problems:
        raise CheckpointError(f"{path} does not match the {variant} model its header describes: " + "; ".join(problems)
                         + ". The file is damaged or was edited; re-create it.")


# -- load ---------------------------------------------------------------------------------------------

def _build_quant_linear(lin: nn.Linear, info: dict, t: dict, name: str, device) -> QuantLinear:
    prefix = name + "."
    leaves = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    return QuantLinear.from_packed(lin.in_features, lin.out_features, info["w_bits"], info["a_bits"],
                                   info["smooth"], info["rotation"], leaves, device)


def read_compressed(path):
    """Validate a compressed checkpoint and read it: (header, config, policy, {key: tensor} on CPU); the
    config is a DiTConfig or a WanConfig (models/family.py: family_of(config)).

    Everything is checked (header, keys, shapes, dtypes) before any tensor is read, so both loaders
    (ours below, and the ComfyUI node's) fail the same clear way on a foreign or damaged file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    meta, index = _read_index(path)
    header, config, policy = _parse_header(path, meta)
    specs = _expected(path, header, config, policy)
    _check_keys(path, index, specs, config.variant)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-create it") from e
    _check_values(path, tensors, policy)
    return header, config, policy, tensors


def _check_values(path: Path, tensors: dict, policy: dict) -> None:
    """Stored values a valid file never holds: a NaN or infinite float (a NaN scale turns the whole
    video into NaN), a float beyond MAX_ABS, a negative weight scale, an activation clip outside
    [0.2, 1], a rotation factor that is not orthogonal."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{path} holds non-finite values (NaN or infinity) in {len(bad)} tensors "
                              f"(e.g. {sorted(bad)[:3]}); the file is damaged: re-create it")
    big = [k for k, t in tensors.items() if t.is_floating_point() and t.numel() and float(t.abs().max()) > MAX_ABS]
    if big:
        raise CheckpointError(f"{path} holds values above {MAX_ABS:g} in magnitude in {len(big)} tensors "
                              f"(e.g. {sorted(big)[:3]}), which no trained model stores; the file is damaged: re-create it")
    for k, t in tensors.items():
        if k.endswith((".rot1", ".rot2")):
            eye = torch.eye(t.shape[0], dtype=torch.float64)
            if float((t.double() @ t.double().T - eye).abs().max()) > ORTHO_TOL:
                raise CheckpointError(f"{path}: rotation factor {k} is not orthogonal; the file is damaged: re-create it")
    for name in policy:
        scale, clip = tensors[f"{name}.weight_scale"], tensors.get(f"{name}.act_clip")
        if bool((scale < 0).any()):
            raise CheckpointError(f"{path}: {name}.weight_scale has negative scales; the file is damaged: re-create it")
        if clip is not None and not 0.2 - 1e-6 <= float(clip) <= 1.0 + 1e-6:
            raise CheckpointError(f"{path}: {name}.act_clip is {float(clip)}, outside [0.2, 1]; the file is damaged "
                                  "or was edited: re-create it")


def load_compressed(path, device="cpu", dtype: torch.dtype = torch.float32):
    """Validate, then build the model: returns (HunyuanVideoDiT or WanDiT with mode-'real' QuantLinears, header).

    Float tensors are cast from bf16 to `dtype`; the quantized layers keep their own float32 state.
    """
    header, config, policy, tensors = read_compressed(path)

    # Built on the meta device and filled by assignment: the float weights of the quantized
    # linears are never allocated.
    model = family_of(config).build(config, device="meta")
    named = dict(model.named_modules())
    for name in policy:
        parent_name, _, child = name.rpartition(".")
        q = _build_quant_linear(named[name], header["layers"][name], tensors, name, device)
        setattr(named[parent_name] if parent_name else model, child, q)
    prefixes = tuple(n + "." for n in policy)
    floats = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items() if not k.startswith(prefixes)}
    model.load_state_dict(floats, strict=False, assign=True)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:  # _check_keys makes this unreachable; kept so a future layout bug cannot go silent
        raise RuntimeError(f"tensors left unloaded: {left[:3]}")
    return model.eval(), header

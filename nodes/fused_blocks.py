"""QuantSparse's fused block forms inside ComfyUI's HunyuanVideo, through its supported hooks only.

`apply_fused_blocks(model)` returns a clone of a ComfyUI ModelPatcher on which every double and single
block runs quantsparse_core's fused forms (models/fusion.py: grouped small ops, torch.compile'd on
CUDA; the producer groups that hand the next quantized linear its int8 codes; q/k RMSNorm + RoPE as
one kernel) on ComfyUI's own modules and weights:
- a block replacement (`transformer_options["patches_replace"]["dit"][("double_block"|"single_block", i)]`)
  per block; a replacement that was already there stays outermost, and the block it wraps
  (`original_block`) becomes ours, so it still decides when a block runs;
- a DIFFUSION_MODEL wrapper that tells the replacements which HunyuanVideo module is executing (a clone
  may run another copy of the model: ComfyUI rebuilds models through `cached_patcher_init`), so the
  replacements never hold module references themselves.
The linears, layer norms and modulations are called as ComfyUI modules (casting, offloading, LoRA weight
functions work as in ComfyUI's forward); the q/k RMSNorm weights go through `comfy.ops.cast_bias_weight`;
attention goes through ComfyUI's entry point (`comfy.ldm.flux.layers.attention` -> optimized_attention)
with the same transformer_options, so `optimized_attention_override` (ours and anyone's) sees every call
with block_type / block_index as ComfyUI sets them. RoPE is applied by the fused group with ComfyUI's `pe`.
Anything else falls back to ComfyUI's own block: per-token modulation (modulation_dims), attn1 patches,
variants (SiLU / Yak MLPs, no modulation), subclasses, unusual dtypes or shapes.
QUANTSPARSE_FUSED_BLOCKS=0 turns the replacement off at run time (every block runs ComfyUI's forward).
"""
from __future__ import annotations

import collections
import logging
import os
import sys
from typing import Optional

import torch

from quantsparse_core.models import fusion

from .instance_patches import call_changed
from .model_family import FUSED, classify, require_supported

KEY = "quantsparse_fused_blocks"        # wrapper key, and the patch functions' marker
_DIT = "quantsparse_fused_dit"          # transformer_options entry: the executing model's diffusion module
WAN_IMAGE_TOKENS = "quantsparse_wan_image_tokens"  # ... and a Wan call's CLIP image tokens (None: none)
ENV = "QUANTSPARSE_FUSED_BLOCKS"
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)

log = logging.getLogger("quantsparse")
counts: collections.Counter = collections.Counter()  # "double"/"single" fused, "fallback: <why>"
_logged: set = set()


class _Fallback(Exception):
    """This call is not one the fused form handles: run ComfyUI's block."""


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


# ---- what ComfyUI's blocks look like --------------------------------------------------------------------
def _layers():
    import comfy.ldm.flux.layers
    return comfy.ldm.flux.layers


def _check_ln(norm) -> None:
    if not isinstance(norm, torch.nn.LayerNorm) or norm.weight is not None or norm.bias is not None \
            or norm.eps != 1e-6:
        raise _Fallback("layer norm is not LayerNorm(eps=1e-6, no affine)")


def _check_gelu(act) -> None:
    if not isinstance(act, torch.nn.GELU) or act.approximate != "tanh":
        raise _Fallback("MLP activation is not GELU(tanh)")


def _norm_weight(norm, like: torch.Tensor) -> torch.Tensor:
    """The RMSNorm weight as ComfyUI's forward would use it for an input like `like` (HunyuanVideo: eps None)."""
    if not isinstance(norm, torch.nn.RMSNorm) or norm.eps is not None or norm.weight is None:
        raise _Fallback("q/k norm is not RMSNorm(eps=None) with a weight")
    return rms_weight(norm, like)


def rms_weight(norm, like: torch.Tensor) -> torch.Tensor:
    """An RMSNorm's weight as ComfyUI's forward casts it for an input like `like`."""
    if getattr(norm, "comfy_cast_weights", False) or getattr(norm, "weight_function", None) \
            or getattr(norm, "bias_function", None):
        # As ComfyUI's RMSNorm forward casts it (offload streams, dynamic VRAM, LoRA weight functions);
        # the fused group needs all four weights at once, so keep a copy ([head_dim] elements) and hand
        # the cast buffer / pinned weight back at once, as ComfyUI does after its own use.
        import comfy.ops
        w, b, handle = comfy.ops.cast_bias_weight(norm, like, offloadable=True)
        if w is not norm.weight:
            w = w.clone()
        comfy.ops.uncast_bias_weight(norm, w, b, handle)
    else:
        w = norm.weight
    if w.dtype != like.dtype or w.device != like.device:
        raise _Fallback("q/k norm weight dtype/device differs from the activations")
    return w


def check_unpatched(*modules) -> None:
    """_Fallback where another node changed what calling one of these modules does (a forward patched on the
    instance, forward hooks: instance_patches.call_changed): the fused form computes what their class's forward
    does without calling it."""
    for m in modules:
        if call_changed(m):
            raise _Fallback(f"{type(m).__name__}'s forward is patched or hooked on the instance")


class _NS:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _attn_view(attn, like):
    norm = attn.norm
    return _NS(qkv=attn.qkv, proj=attn.proj,
               norm=_NS(query_norm=_NS(weight=_norm_weight(norm.query_norm, like)),
                        key_norm=_NS(weight=_norm_weight(norm.key_norm, like))))


def _mlp(seq):
    if not isinstance(seq, torch.nn.Sequential) or len(seq) != 3:
        raise _Fallback("MLP is not Linear, GELU, Linear")
    _check_gelu(seq[1])
    check_unpatched(seq, seq[1])  # its linears are called as modules: their patches apply
    return seq


def _mod6(modulation):
    def run(vec):
        m1, m2 = modulation(vec)
        return m1.shift, m1.scale, m1.gate, m2.shift, m2.scale, m2.gate
    return run


def _mod3(modulation):
    def run(vec):
        m, _ = modulation(vec)
        return m.shift, m.scale, m.gate
    return run


def double_view(block, ops, like):
    """ComfyUI's DoubleStreamBlock seen as fusion.double_block_fused expects our blocks."""
    if type(block) is not _layers().DoubleStreamBlock:
        raise _Fallback(f"double block class {type(block).__name__}")
    check_unpatched(block, block.img_norm1, block.img_norm2, block.txt_norm1, block.txt_norm2,
                    *(m for a in (block.img_attn, block.txt_attn) for m in (a.norm, a.norm.query_norm, a.norm.key_norm)))
    if not block.modulation:
        raise _Fallback("double block without modulation")
    for s in ("img", "txt"):
        _check_ln(getattr(block, f"{s}_norm1"))
        _check_ln(getattr(block, f"{s}_norm2"))
    return _NS(heads=block.num_heads, ops=ops, quantize_inputs=True,
               img_mod=_mod6(block.img_mod), txt_mod=_mod6(block.txt_mod),
               img_attn=_attn_view(block.img_attn, like), txt_attn=_attn_view(block.txt_attn, like),
               img_mlp=_mlp(block.img_mlp), txt_mlp=_mlp(block.txt_mlp))


def single_view(block, ops, like):
    """ComfyUI's SingleStreamBlock seen as fusion.single_block_fused expects our blocks."""
    if type(block) is not _layers().SingleStreamBlock:
        raise _Fallback(f"single block class {type(block).__name__}")
    check_unpatched(block, block.pre_norm, block.norm, block.norm.query_norm, block.norm.key_norm, block.mlp_act)
    if block.modulation is None:
        raise _Fallback("single block without modulation")
    if block.yak_mlp or block.mlp_hidden_dim_first != block.mlp_hidden_dim:
        raise _Fallback("single block with a gated MLP")
    _check_gelu(block.mlp_act)
    _check_ln(block.pre_norm)
    norm = block.norm
    return _NS(heads=block.num_heads, hidden=block.hidden_size, mlp_hidden=block.mlp_hidden_dim, ops=ops,
               quantize_inputs=True, modulation=_mod3(block.modulation), linear1=block.linear1,
               linear2=block.linear2,
               norm=_NS(query_norm=_NS(weight=_norm_weight(norm.query_norm, like)),
                        key_norm=_NS(weight=_norm_weight(norm.key_norm, like))))


# ---- one block call ----------------------------------------------------------------------------------
def _check_inputs(xs, vec, pe, length: int) -> None:
    first = xs[0]
    for x in xs:
        if x.ndim != 3 or x.dtype not in _FLOAT or x.dtype != first.dtype or x.device != first.device \
                or x.shape[0] != first.shape[0]:
            raise _Fallback("activations are not [B, L, C] tensors of one float dtype and device")
    if not torch.is_tensor(vec) or vec.ndim != 2 or vec.shape[0] != first.shape[0]:
        raise _Fallback("vec is not [B, C] (per-token modulation or no modulation)")
    if not torch.is_tensor(pe) or pe.ndim != 6 or pe.dtype != torch.float32 or pe.shape[1] != 1 \
            or pe.shape[2] != length or pe.shape[0] not in (1, first.shape[0]) or pe.shape[-2:] != (2, 2):
        raise _Fallback("pe is not an fp32 [B, 1, L, D/2, 2, 2] RoPE table over the joint sequence")


def _attention_fn(to: dict):
    def attention(q, k, v, mask, call):
        # ComfyUI's own entry point (looked up now, so a patched one is honoured) with RoPE already
        # applied by the fused group: pe=None, it goes straight to optimized_attention.
        return sys.modules["comfy.ldm.flux.layers"].attention(q, k, v, pe=None, mask=mask, transformer_options=to)
    return attention


def ops_for(x: torch.Tensor, compile: Optional[bool]):
    return fusion.small_ops(x.is_cuda if compile is None else (compile and x.is_cuda))


def why(kind: str, reason: str) -> None:
    counts[f"fallback: {reason}"] += 1
    if (kind, reason) not in _logged:
        _logged.add((kind, reason))
        log.info("QuantSparse fused %s blocks: running ComfyUI's block (%s)", kind, reason)


def block_for(kind: str, index: int, args: dict, attr: str = ""):
    """(ComfyUI's block `index` of the executing model's `attr` list (default "<kind>_blocks"), this call's
    transformer_options); _Fallback where the fused form does not apply to the model or the call."""
    to = args.get("transformer_options") or {}
    dit = to.get(_DIT)
    if dit is None:
        raise _Fallback("the executing model is unknown (no fused-blocks wrapper ran)")
    variant = classify(dit)
    if variant not in FUSED:
        raise _Fallback(f"the model is {variant}")
    blocks = getattr(dit, attr or f"{kind}_blocks", None)
    if blocks is None or index >= len(blocks):
        raise _Fallback(f"the model has no {kind} block {index}")
    patches = to.get("patches") or {}
    if patches.get("attn1_patch") or patches.get("attn1_output_patch"):
        raise _Fallback("attn1 patches are set")
    return blocks[index], to


def run_double(index: int, args: dict, compile: Optional[bool] = None) -> dict:
    """ComfyUI's double block `index` in fused form; raises _Fallback when it does not apply."""
    block, to = block_for("double", index, args)
    if args.get("modulation_dims_img") is not None or args.get("modulation_dims_txt") is not None:
        raise _Fallback("per-token modulation (modulation_dims)")
    img, txt, vec, pe = args["img"], args["txt"], args["vec"], args["pe"]
    _check_inputs((img, txt), vec, pe, img.shape[1] + txt.shape[1])
    view = double_view(block, ops_for(img, compile), img)
    img, txt = fusion.double_block_fused(view, img, txt, vec, pe, args.get("attention_mask"), _attention_fn(to), None)
    counts["double"] += 1
    return {"img": img, "txt": txt}


def run_single(index: int, args: dict, compile: Optional[bool] = None) -> dict:
    """ComfyUI's single block `index` in fused form; raises _Fallback when it does not apply."""
    block, to = block_for("single", index, args)
    if args.get("modulation_dims") is not None:
        raise _Fallback("per-token modulation (modulation_dims)")
    x, vec, pe = args["img"], args["vec"], args["pe"]
    _check_inputs((x,), vec, pe, x.shape[1])
    view = single_view(block, ops_for(x, compile), x)
    x = fusion.single_block_fused(view, x, vec, pe, args.get("attention_mask"), _attention_fn(to), None)
    counts["single"] += 1
    return {"img": x}


def _runner(kind: str):
    if kind == "wan":
        from .fused_wan import run_wan  # it builds on this module's checks
        return run_wan
    return {"double": run_double, "single": run_single}[kind]


# The block kinds' keys in transformer_options["patches_replace"]["dit"] (WanModel calls its blocks "double").
REPLACE_KEY = {"double": "double_block", "single": "single_block", "wan": "double_block"}


def make_replacement(kind: str, index: int, previous=None, compile: Optional[bool] = None):
    """The patches_replace function for ComfyUI's `kind` ("double"/"single"/"wan") block `index`. A
    replacement that was there before (`previous`) is called first, with our fused block as its
    original_block; ours falls back to ComfyUI's block for any call it does not handle."""
    run = _runner(kind)

    def fused_or_original(original):
        def block_fn(args):
            if enabled_by_env():
                try:
                    return run(index, args, compile)
                except _Fallback as e:
                    why(kind, str(e))
            return original(args)
        return block_fn

    def quantsparse_fused_block(args, extra):
        inner = fused_or_original(extra["original_block"])
        if previous is not None:
            return previous(args, {**extra, "original_block": inner})
        return inner(args)

    quantsparse_fused_block.quantsparse_previous = previous
    setattr(quantsparse_fused_block, KEY, (kind, index))
    return quantsparse_fused_block


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Names the executing model in this call's transformer_options for the replacements (and, for Wan, how
    many CLIP image tokens lead its context: WanModel hands its blocks that length, not their replacements)."""
    to = kwargs.get("transformer_options")
    if not isinstance(to, dict):
        to = next((a for a in reversed(args) if isinstance(a, dict)), None)
    if to is None:
        return executor(*args, **kwargs)
    entries = {_DIT: executor.class_obj}
    if type(executor.class_obj).__name__ == "WanModel":
        from .sparse_patch import _argument
        clip = _argument(executor, args, kwargs, "clip_fea")
        entries[WAN_IMAGE_TOKENS] = clip.shape[-2] if torch.is_tensor(clip) else None
    missing = object()
    old = {key: to.get(key, missing) for key in entries}
    to.update(entries)
    try:
        return executor(*args, **kwargs)
    finally:
        for key, value in old.items():
            if value is missing:
                to.pop(key, None)
            else:
                to[key] = value


# ---- on a ModelPatcher ----------------------------------------------------------------------------------
def _replacements(patcher) -> dict:
    return patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def _block_counts(patcher):
    dit = patcher.model.diffusion_model
    if type(dit).__name__ == "WanModel":
        return {"wan": len(dit.blocks)}
    return {"double": len(getattr(dit, "double_blocks", [])), "single": len(getattr(dit, "single_blocks", []))}


def is_fused(patcher) -> bool:
    return any(hasattr(fn, KEY) for fn in _replacements(patcher).values())


def install_fused_blocks(patcher, compile: Optional[bool] = None) -> None:
    """Install the fused replacements on `patcher` itself (call on a clone you own)."""
    import comfy.patcher_extension

    require_supported(patcher, "QuantSparse fused blocks", FUSED)

    existing = _replacements(patcher)
    for kind, n in _block_counts(patcher).items():
        for i in range(n):
            previous = existing.get((REPLACE_KEY[kind], i))
            previous = getattr(previous, "quantsparse_previous", previous) if hasattr(previous, KEY) else previous
            patcher.set_model_patch_replace(make_replacement(kind, i, previous, compile), "dit", REPLACE_KEY[kind], i)
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patcher.remove_wrappers_with_key(kind, KEY)
    patcher.add_wrapper_with_key(kind, KEY, diffusion_model_wrapper)


def remove_fused_blocks(patcher) -> None:
    """Undo install_fused_blocks on `patcher` itself: replacements that were there before ours come back."""
    import comfy.patcher_extension

    to = patcher.model_options.setdefault("transformer_options", {})
    replace = to.get("patches_replace", {})
    dit = dict(replace.get("dit", {}))
    for key, fn in list(dit.items()):
        if hasattr(fn, KEY):
            previous = fn.quantsparse_previous
            if previous is None:
                del dit[key]
            else:
                dit[key] = previous
    if "patches_replace" in to:
        to = patcher.model_options["transformer_options"] = dict(to)
        to["patches_replace"] = {**replace, "dit": dit}
    patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)


def apply_fused_blocks(model, enabled: bool = True, compile: Optional[bool] = None):
    """A clone of `model` (a ComfyUI HunyuanVideo ModelPatcher) whose double/single blocks run the fused
    forms (enabled=True), or run ComfyUI's blocks again (enabled=False). compile: torch.compile the
    small-op groups; None = on CUDA tensors only (the CPU runs them eagerly)."""
    patched = model.clone()
    if enabled:
        install_fused_blocks(patched, compile)
    else:
        remove_fused_blocks(patched)
    return patched

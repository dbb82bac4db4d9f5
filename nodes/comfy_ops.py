"""Load a QuantSparse compressed checkpoint as ComfyUI's own model for it (HunyuanVideo or WanModel).

ComfyUI builds its model class from the checkpoint (`load_diffusion_model_state_dict`) with
our custom operations: every Linear is created without allocating a weight, and becomes either a
plain ComfyUI linear (bf16 tensors of the file) or a quantized linear (the file's packed integer
weights, computed by quantsparse_core's QuantLinear) when the state dict is loaded. ComfyUI's model
management (offloading, reloading, memory accounting) then works on the real stored bytes.

A quantized linear also behaves like a ComfyUI weight where users expect it (docs/LORA.md):
- LoRA: its state dict has an empty `<layer>.weight` entry, so ComfyUI's LoRA loaders map and
  accept LoRA keys for it (keys matching no layer keep ComfyUI's "lora key not loaded" warning).
  The weights stay packed: a PatcherInjection, which ComfyUI runs when it loads the MODEL for a run
  and undoes when it unloads it, gives each layer the low-rank LoRA patches of the loaded patcher,
  added to the quantized GEMM's output: y = Q(x) + sum_i s_i alpha_i / r_i (x down_i^T) up_i^T;
  hook LoRAs (per conditioning, keyframed) join that side path per model call;
- offload: a layer ComfyUI left on another device than its input runs on copies of its tensors made
  for that call (no module is rebuilt);
- save: ComfyUI's checkpoint format cannot hold the packed layers, so ModelSave / CheckpointSave of
  a compressed MODEL stop with a message naming the file to use instead.
"""
from __future__ import annotations

import inspect
import itertools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from quantsparse_core.io.checkpoint import read_compressed
from quantsparse_core.models.family import family_of
from quantsparse_core.quant.linear import QuantizedInput, QuantLinear

SUBFOLDER = "quantsparse"  # inside ComfyUI's diffusion_models folder
_UNET_PREFIX = "diffusion_model."
COMFY_CLASS = {"hunyuan_video": "HunyuanVideo", "wan": "WanModel"}  # by models/family.py name
# Float weights ComfyUI's detection reads the shape of (comfy/model_detection.py), by family: where the file holds
# such a layer packed, the loader passes a meta tensor of that shape beside it (no memory; our Linear ignores it).
DETECTION_WEIGHTS = {"wan": {"blocks.0.ffn.0.weight": lambda c: (c.ffn_dim, c.dim)}}
LORA_INJECTION = "quantsparse_lora"  # ModelPatcher injection key

log = logging.getLogger("quantsparse")


class _PrebuiltQuantLinear(QuantLinear):
    """A QuantLinear its parent built from the file; torch's recursive state-dict loading must leave
    it alone (the parent consumed the keys), or ComfyUI would log its buffers as missing."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        return


class _Rows(torch.nn.Module):
    """q.forward_rows as a module's forward, so torch.func.functional_call can run it on copies."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.q = q

    def forward(self, x, start: int, end: int):
        return self.q.forward_rows(x, start, end)


def _run_on_copies(q: QuantLinear, x, device, rows=None):
    """q(x) (or q.forward_rows(x, *rows)) with q's tensors copied to `device` for this call only: a
    layer ComfyUI offloaded runs where its input is, with the same math (so the same output) as if it
    had been moved there."""
    tensors = {k: t.to(device, copy=True) for k, t in itertools.chain(q.named_parameters(), q.named_buffers())}
    try:
        if rows is None:
            return torch.func.functional_call(q, tensors, (x,))
        return torch.func.functional_call(_Rows(q), {f"q.{k}": t for k, t in tensors.items()}, (x, *rows))
    finally:
        q._kernel_state = None  # the kernel layout made from the copies must not stay on the device


def make_operations(layers: dict):
    """ComfyUI operations for one checkpoint: `layers` is the header's {linear name: w/a bits, ...}."""
    import comfy.ops

    class QuantSparseOps(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # No allocation: the file decides what this layer holds (a 13B model's bf16 weights
                # must never be materialised just to be replaced by 4-bit ones).
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.weight = None
                self.bias = None
                self.quant = None
                self.lora = None        # (down [R, in], up [out, R]) of the loaded patcher's LoRAs, fp32
                self._lora_cast = None  # ((device, dtype), down, up) as the last input needed them
                self._lora_static, self._lora_hooked = [], []  # the pairs lora joins: MODEL LoRAs, hook LoRAs
                self.weight_comfy_model_dtype = dtype
                self.bias_comfy_model_dtype = dtype

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                name = prefix[:-1]
                if name.startswith(_UNET_PREFIX):
                    name = name[len(_UNET_PREFIX):]
                mine = {k[len(prefix):]: v for k, v in state_dict.items()
                        if k.startswith(prefix) and "." not in k[len(prefix):]}
                if name in layers:
                    info = layers[name]
                    self.quant = _PrebuiltQuantLinear.from_packed(
                        self.in_features, self.out_features, info["w_bits"], info["a_bits"], info["smooth"],
                        info["rotation"], mine, device="cpu")
                    # ComfyUI's LoRA loaders find a layer by its '<layer>.weight' state-dict key; an
                    # empty buffer puts the key there at no cost (a buffer: ComfyUI patches, pins and
                    # casts parameters only). The weight itself stays packed in self.quant.
                    del self.weight
                    self.register_buffer("weight", torch.empty(0, dtype=self.weight_comfy_model_dtype))
                    return
                if "weight" not in mine:
                    missing_keys.append(prefix + "weight")
                    return
                self.weight = torch.nn.Parameter(mine["weight"], requires_grad=False)
                if "bias" in mine:
                    self.bias = torch.nn.Parameter(mine["bias"], requires_grad=False)

            def input_quant_spec(self, x):
                """QuantLinear.input_quant_spec of the quantized layer where it runs beside x (the fused
                blocks' producers then hand forward() a QuantizedInput); None: pass x as it is, also
                when a LoRA side path (ours, or ComfyUI's bypass LoRA, which replaces forward on the
                instance) needs the float input."""
                q = self.quant
                if q is None or self.lora is not None or "forward" in self.__dict__ or q.w_packed.device != x.device:
                    return None
                return q.input_quant_spec(x)

            def forward(self, x, *args, **kwargs):
                if self.quant is None:
                    return super().forward(x, *args, **kwargs)
                q = self.quant
                device = x.codes.device if isinstance(x, QuantizedInput) else x.device
                y = q(x) if q.w_packed.device == device else _run_on_copies(q, x, device)
                return y if self.lora is None else y + self._lora_out(x)

            @property
            def forward_rows(self):
                """(x, start, end) -> forward(x)[..., start:end] computing only those output features
                (fusion.single_block_fused: linear1's q/k/v before attention, its MLP part per token
                chunk after it), or None where that would cost the whole output: a plain layer, or
                one whose forward ComfyUI replaced (bypass LoRA)."""
                if self.quant is None or "forward" in self.__dict__:
                    return None
                return self._forward_rows

            def _forward_rows(self, x, start: int, end: int):
                q = self.quant
                device = x.codes.device if isinstance(x, QuantizedInput) else x.device
                y = (q.forward_rows(x, start, end) if q.w_packed.device == device
                     else _run_on_copies(q, x, device, rows=(start, end)))
                return y if self.lora is None else y + self._lora_out(x, start, end)

            def _lora_out(self, x, start: int = 0, end: int = None):
                """sum_i s_i alpha_i / r_i (x down_i^T) up_i[start:end]^T, in x's dtype on x's device."""
                if isinstance(x, QuantizedInput):
                    raise ValueError("a LoRA on a quantized layer needs the float input, not a QuantizedInput")
                c = self._lora_cast
                if c is None or c[0] != (x.device, x.dtype):
                    down, up = self.lora
                    c = self._lora_cast = ((x.device, x.dtype), down.to(x.device, x.dtype), up.to(x.device, x.dtype))
                return F.linear(F.linear(x, c[1]), c[2][start:end])

    return QuantSparseOps


# ---- LoRA on the quantized layers --------------------------------------------------------------------
def _quantized_layers(patcher):
    """(the key ComfyUI patches, module) of each quantized linear of a patcher's model."""
    for name, m in patcher.model.diffusion_model.named_modules():
        if isinstance(getattr(m, "quant", None), QuantLinear):
            yield f"{_UNET_PREFIX}{name}.weight", m


def _low_rank(patch, m):
    """(down [r, in], up [out, r] * strength * alpha / r) in fp32 for a plain LoRA patch, which is what
    the side path runs exactly; else the reason it cannot (a string)."""
    from comfy.weight_adapter import LoRAAdapter

    strength, v, strength_model, offset, function = patch
    if not isinstance(v, LoRAAdapter):
        if isinstance(v, tuple):  # comfy.lora.calculate_weight's forms: (diff,) or (type, data)
            return f"'{v[0] if len(v) == 2 else 'diff'}' patch"
        return "model merge patch" if isinstance(v, list) else f"{type(v).__name__} patch"
    if strength_model != 1.0 or offset is not None or function is not None:
        return "scaled, offset or function patch"
    up, down, alpha, mid, dora_scale, reshape = v.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return "LoRA with mid, DoRA or reshape"
    if up.ndim != 2 or down.ndim != 2 or tuple(up.shape[:1]) + tuple(down.shape[1:]) != (m.out_features, m.in_features) \
            or up.shape[1] != down.shape[0]:
        return f"LoRA of shape {tuple(up.shape)} x {tuple(down.shape)} for a {m.out_features} x {m.in_features} layer"
    scale = strength * (1.0 if alpha is None else float(alpha) / down.shape[0])
    return down.float(), up.float() * scale


def _low_rank_pairs(patches, key, m, skipped, strength=1.0) -> list:
    """The (down, up) side paths of a layer's patch list at `strength` (a hook keyframe's); patches a side path
    cannot run go to `skipped`."""
    pairs = []
    for p in patches:
        if p[0] * strength == 0.0:
            continue  # strength 0: exactly the layer without this LoRA
        lr = _low_rank((p[0] * strength,) + tuple(p[1:]), m)
        if isinstance(lr, str):
            skipped.append(f"{key} ({lr})")
        else:
            pairs.append(lr)
    return pairs


def _set_lora(m, static=None, hooked=None):
    """A layer's side path = its MODEL's LoRAs (`static`) + the hook LoRAs of the conditioning running now
    (`hooked`); None leaves that part as it is. One concatenated (down, up) pair, or None."""
    if static is not None:
        m._lora_static = static
    if hooked is not None:
        m._lora_hooked = hooked
    pairs = m._lora_static + m._lora_hooked
    m.lora = None if not pairs else (torch.cat([d for d, _ in pairs]), torch.cat([u for _, u in pairs], dim=1))
    m._lora_cast = None


def _warn_skipped(skipped):
    if skipped:
        log.warning("QuantSparse: %d weight patches on quantized layers NOT applied (a quantized layer takes "
                    "plain LoRA up/down patches, added beside its packed weight): %s", len(skipped),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))


def _inject_lora(patcher):
    """ComfyUI calls this when it loads `patcher` for a run: the quantized layers take its LoRA patches."""
    skipped = []
    for key, m in _quantized_layers(patcher):
        _set_lora(m, static=_low_rank_pairs(patcher.patches.get(key, ()), key, m, skipped))
    _warn_skipped(skipped)


def _eject_lora(patcher):
    """ComfyUI calls this when it unloads `patcher`: the layers drop its LoRAs (and any hook LoRAs)."""
    for _, m in _quantized_layers(patcher):
        _set_lora(m, static=[], hooked=[])
    patcher.model.__dict__.pop(_HOOK_STATE, None)


# ---- hook LoRAs (CreateHookLora + keyframes, per conditioning) on the quantized layers ------------------------
# ComfyUI applies a hook LoRA by computing the patched weight of each layer it touches (and, in its MaxSpeed
# mode, caching it): that would need a dense weight, which a quantized layer does not have. So its patches are
# taken out of ComfyUI's weight path when ComfyUI registers them, and each model call gives the quantized
# layers the side paths of the hooks of the conditioning it runs, at their current keyframe strength.
HOOK_KEY = "quantsparse_hook_lora"   # callback / wrapper key on the ModelPatcher
_HOOK_PATCHES = "quantsparse_hook_patches"   # on the BaseModel (shared by clones): {hook_ref: {key: [patch]}}
_HOOK_STATE = "quantsparse_hook_state"       # on the BaseModel: which hooks and strengths the layers hold


def _take_hook_patches(patcher, hooks, target_dict, model_options, registered):
    """ON_REGISTER_ALL_HOOK_PATCHES: move the quantized layers' keys out of ComfyUI's hook patches (their
    patches for a hook depend only on the hook and the model, so they are kept on the model, per hook)."""
    quantized = {key for key, _ in _quantized_layers(patcher)}
    store = patcher.model.__dict__.setdefault(_HOOK_PATCHES, {})
    for ref, patches in patcher.hook_patches.items():
        mine = {k: patches.pop(k) for k in list(patches) if k in quantized}
        if mine:
            store[ref] = mine


def _sync_hook_loras(patcher) -> None:
    """Give the quantized layers the side paths of `patcher.current_hooks` (the conditioning ComfyUI runs
    now) at their keyframe strengths; nothing to do while those did not change."""
    from comfy.hooks import EnumHookType

    store = patcher.model.__dict__.get(_HOOK_PATCHES)
    hooks = patcher.current_hooks
    active = [] if not store or hooks is None else \
        [(h, store[h.hook_ref]) for h in hooks.get_type(EnumHookType.Weight) if h.hook_ref in store]
    state = tuple((id(h.hook_ref), float(h.strength)) for h, _ in active)
    if patcher.model.__dict__.get(_HOOK_STATE, ()) == state:
        return
    skipped = []
    for key, m in _quantized_layers(patcher):
        _set_lora(m, hooked=[pr for h, patches in active
                             for pr in _low_rank_pairs(patches.get(key, ()), key, m, skipped, float(h.strength))])
    patcher.model.__dict__[_HOOK_STATE] = state
    _warn_skipped(skipped)


def _hook_lora_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: every model call runs with the hook LoRAs of its own conditioning."""
    patcher = getattr(executor.class_obj, "current_patcher", None)
    if patcher is not None:
        _sync_hook_loras(patcher)
    return executor(*args, **kwargs)


def _add_hook_lora_support(patcher) -> None:
    from comfy.patcher_extension import CallbacksMP, WrappersMP
    patcher.add_callback_with_key(CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES, HOOK_KEY, _take_hook_patches)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, HOOK_KEY, _hook_lora_wrapper)


# ---- saving ---------------------------------------------------------------------------------------
def _refuse_save(path):
    """Stands in for the model's state_dict_for_saving (what ModelSave and CheckpointSave call), so a
    save stops before any file is written instead of writing one nothing can load."""
    def state_dict_for_saving(*args, **kwargs):
        raise ValueError(
            "QuantSparse: a compressed MODEL cannot be saved with ModelSave / CheckpointSave: ComfyUI's checkpoint "
            "format has no place for its packed low-bit layers, so the file would not load back. The compressed "
            f"checkpoint already is a file: {path} (copy it; Load Compressed DiT loads it). For a LoRA, load it at "
            "run time with a LoRA loader after Load Compressed DiT, or apply it to the full-precision MODEL and run "
            "QuantSparse Calibrate to bake it in.")
    return state_dict_for_saving


def _supports_disable_dynamic(fn) -> bool:
    return "disable_dynamic" in inspect.signature(fn).parameters


def load_compressed_patcher(path, disable_dynamic: bool = True):
    """A ComfyUI ModelPatcher for the compressed checkpoint at `path` (validated first).

    Dynamic VRAM is disabled for this model by default: our quantized layers hold packed buffers that
    ComfyUI's dynamic loader has not been verified with. ComfyUI can rebuild the model later through
    `cached_patcher_init`, which calls this function again. The LoRA injection and the save refusal
    go with every clone (LoRA loaders, the pack's own patches).
    """
    import comfy.sd
    from comfy.patcher_extension import PatcherInjection

    path = Path(path)
    header, config, policy, tensors = read_compressed(path)
    ops = make_operations(header["layers"])
    kwargs = {"model_options": {"custom_operations": ops}}
    if _supports_disable_dynamic(comfy.sd.load_diffusion_model_state_dict):
        kwargs["disable_dynamic"] = disable_dynamic
    family = family_of(config)
    for key, shape in DETECTION_WEIGHTS.get(family.name, {}).items():
        if key not in tensors and key[: -len(".weight")] in policy:
            tensors[key] = torch.empty(shape(config), device="meta", dtype=torch.bfloat16)
    patcher = comfy.sd.load_diffusion_model_state_dict(tensors, **kwargs)
    if patcher is None or type(patcher.model.diffusion_model).__name__ != COMFY_CLASS[family.name]:
        built = "nothing" if patcher is None else type(patcher.model.diffusion_model).__name__
        raise ValueError(f"ComfyUI did not recognise {path} as a {family.title} model (it built {built}); "
                         "update ComfyUI, or re-create the checkpoint with QuantSparse")
    patcher.cached_patcher_init = (load_compressed_patcher, (str(path),))
    patcher.quantsparse_header = header
    patcher.set_injections(LORA_INJECTION, [PatcherInjection(inject=_inject_lora, eject=_eject_lora)])
    _add_hook_lora_support(patcher)
    patcher.add_object_patch("state_dict_for_saving", _refuse_save(path))
    return patcher

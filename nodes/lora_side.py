"""LoRAs on the quantized layers of a compressed MODEL, as low-rank side paths beside the packed weight
(docs/LORA.md): y = Q(x) + sum_i s_i alpha_i / r_i (x down_i^T) up_i^T. No dense weight is ever made: the
LoRAs' down projections run as one GEMM (on the producer's int8 codes where the fused blocks quantize the
layer's input, quant.low_rank), their up projections inside the quantized GEMM's epilogue.

Each quantized layer holds two parts, each one concatenated (down, up) pair or none:
- "static": the LoRAs on the MODEL (LoraLoader, ...), taken from the patcher ComfyUI loads for a run (a
  PatcherInjection), recomputed only when the layer's patches change;
- "hooked": the hook LoRAs (CreateHookLora, keyframes) of the conditioning a model call runs, taken out of
  ComfyUI's dense-weight hook path when ComfyUI registers them (ON_REGISTER_ALL_HOOK_PATCHES) and synced per
  model call (an APPLY_MODEL wrapper), recomputed only when the hooks or a keyframe strength change.
ComfyUI ejects and re-injects the patcher at every switch of hooks (cond / uncond): that only turns the parts
off and on again; their device copies stay until ComfyUI detaches (unloads) the model (ON_DETACH).
"""
from __future__ import annotations

import logging

import torch

from quantsparse_core.quant.linear import QuantizedInput, QuantLinear
from quantsparse_core.quant.low_rank import LowRank

UNET_PREFIX = "diffusion_model."
INJECTION = "quantsparse_lora"        # PatcherInjection key
HOOK_KEY = "quantsparse_hook_lora"    # callback / wrapper key
PARTS = ("static", "hooked")
_HOOK_PATCHES = "quantsparse_hook_patches"   # on the BaseModel (shared by clones): {hook_ref: {key: [patch]}}
_HOOK_STATE = "quantsparse_hook_state"       # on the BaseModel: which hooks and strengths the layers hold

log = logging.getLogger("quantsparse")


KEEP = 2   # pairs (and device copies) kept per part: a hook on the positive prompt only alternates two states


class SidePaths:
    """A quantized layer's LoRA parts: {part: (key, (down, up) fp32 or None)}, the last KEEP pairs of each part,
    whether they are on (the patcher is injected), and the active parts joined into one (down, up) in the
    input's device and dtype (the last KEEP * KEEP joins: cond and uncond may each have their own)."""

    def __init__(self):
        self.parts = {p: (None, None) for p in PARTS}
        self.kept = {p: {} for p in PARTS}   # part -> {key: [pair, sources]}
        self.joined = {}                     # (part keys, device, dtype) -> (down [R, in], up [out, R])
        self.active = None                   # the parts in use, or None

    def use(self, part: str, key) -> bool:
        """Make the kept pair of `key` the part's current one; False if it is not kept."""
        if key not in self.kept[part]:
            return False
        self.parts[part] = (key, self.kept[part][key][0])
        return True

    def set(self, part: str, key, pairs: list, sources=None) -> None:
        """`sources`: what `key` names by id, held while the pair is kept (so no id is reused meanwhile)."""
        pair = None if not pairs else (torch.cat([d for d, _ in pairs]), torch.cat([u for _, u in pairs], dim=1))
        kept = self.kept[part]
        kept[key] = [pair, sources]
        while len(kept) > KEEP:
            gone = next(iter(kept))
            del kept[gone]
            self.joined = {k: v for k, v in self.joined.items() if (part, gone) not in k[0]}
        self.parts[part] = (key, pair)

    def key(self, part: str):
        return self.parts[part][0]

    def turn_on(self) -> None:
        pairs = tuple(part for part in PARTS if self.parts[part][1] is not None)
        self.active = pairs or None

    def turn_off(self) -> None:
        self.active = None

    def forget(self) -> None:
        self.__init__()

    def low_rank(self, x) -> LowRank:
        """The active parts as one side path for QuantLinear(x, side=...): their ranks concatenated, in x's
        dtype on x's device (x float, or a producer's QuantizedInput: LowRank makes h from either)."""
        device = x.codes.device if isinstance(x, QuantizedInput) else x.device
        key = (tuple((part, self.parts[part][0]) for part in self.active), device, x.dtype)
        side = self.joined.get(key)
        if side is None:
            down = torch.cat([self.parts[part][1][0] for part in self.active])
            up = torch.cat([self.parts[part][1][1] for part in self.active], dim=1)
            side = LowRank(down.to(device, x.dtype), up.to(device, x.dtype))
            while len(self.joined) >= KEEP * KEEP:
                del self.joined[next(iter(self.joined))]
            self.joined[key] = side
        return side


_LAYERS = "quantsparse_quantized_layers"   # on the BaseModel: its quantized linears, listed once


def quantized_layers(patcher) -> list:
    """(the key ComfyUI patches, module) of each quantized linear of a patcher's model; the walk over the model's
    modules is made once per model (the layers are fixed once the file is loaded; clones share the model), not at
    every inject, eject and hook switch."""
    layers = patcher.model.__dict__.get(_LAYERS)
    if layers is None:
        layers = patcher.model.__dict__[_LAYERS] = [
            (f"{UNET_PREFIX}{name}.weight", m) for name, m in patcher.model.diffusion_model.named_modules()
            if isinstance(getattr(m, "quant", None), QuantLinear)]
    return layers


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


def _warn_skipped(skipped):
    if skipped:
        log.warning("QuantSparse: %d weight patches on quantized layers NOT applied (a quantized layer takes "
                    "plain LoRA up/down patches, added beside its packed weight): %s", len(skipped),
                    ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))


# ---- the MODEL's LoRAs ---------------------------------------------------------------------------------
def inject(patcher):
    """PatcherInjection.inject (ComfyUI loads `patcher` for a run): the layers take its LoRA patches."""
    skipped = []
    for key, m in quantized_layers(patcher):
        sp, patches = m.side_paths, patcher.patches.get(key, ())
        which = tuple((id(p[1]), p[0], p[2]) for p in patches)   # the patches by identity, strengths
        if sp.key("static") != which and not sp.use("static", which):
            sp.set("static", which, _low_rank_pairs(patches, key, m, skipped), sources=list(patches))
        sp.turn_on()
    _warn_skipped(skipped)


def eject(patcher):
    """PatcherInjection.eject (ComfyUI unloads `patcher`, or swaps hooks): the side paths go off, kept."""
    for _, m in quantized_layers(patcher):
        m.side_paths.turn_off()


def detach(patcher, unpatch_all=True):
    """ON_DETACH (ComfyUI unloads the model): drop the side paths and their device copies."""
    for _, m in quantized_layers(patcher):
        m.side_paths.forget()
    patcher.model.__dict__.pop(_HOOK_STATE, None)


# ---- hook LoRAs -------------------------------------------------------------------------------------------
def take_hook_patches(patcher, hooks, target_dict, model_options, registered):
    """ON_REGISTER_ALL_HOOK_PATCHES: move the quantized layers' keys out of ComfyUI's hook patches (their
    patches for a hook depend only on the hook and the model, so they are kept on the model, per hook); hooks
    this patcher no longer has registered (ComfyUI restores its hook patches after each run) are dropped."""
    quantized = {key for key, _ in quantized_layers(patcher)}
    old = patcher.model.__dict__.get(_HOOK_PATCHES, {})
    store = {}
    for ref, patches in patcher.hook_patches.items():
        mine = {k: patches.pop(k) for k in list(patches) if k in quantized}
        if mine or ref in old:
            store[ref] = mine or old[ref]
    patcher.model.__dict__[_HOOK_PATCHES] = store


def sync_hooks(patcher) -> None:
    """Give the quantized layers the side paths of `patcher.current_hooks` (the conditioning ComfyUI runs
    now) at their keyframe strengths; nothing to do while those did not change."""
    from comfy.hooks import EnumHookType

    store = patcher.model.__dict__.get(_HOOK_PATCHES)
    hooks = patcher.current_hooks
    active = [] if not store or hooks is None else \
        [(h, store[h.hook_ref]) for h in hooks.get_type(EnumHookType.Weight) if h.hook_ref in store]
    state = tuple((h.hook_ref, float(h.strength)) for h, _ in active)  # the refs, not ids: kept pairs keep them alive
    if patcher.model.__dict__.get(_HOOK_STATE, ()) == state:
        return
    skipped = []
    for key, m in quantized_layers(patcher):
        sp = m.side_paths
        if not sp.use("hooked", state):
            sp.set("hooked", state, [pr for h, patches in active
                                     for pr in _low_rank_pairs(patches.get(key, ()), key, m, skipped, float(h.strength))])
        sp.turn_on()
    patcher.model.__dict__[_HOOK_STATE] = state
    _warn_skipped(skipped)


def _hook_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: every model call runs with the hook LoRAs of its own conditioning."""
    patcher = getattr(executor.class_obj, "current_patcher", None)
    if patcher is not None:
        sync_hooks(patcher)
    return executor(*args, **kwargs)


def attach(patcher) -> None:
    """Give a compressed MODEL's patcher (and its clones) LoRA side paths on its quantized layers."""
    from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP
    patcher.set_injections(INJECTION, [PatcherInjection(inject=inject, eject=eject)])
    patcher.add_callback_with_key(CallbacksMP.ON_DETACH, HOOK_KEY, detach)
    patcher.add_callback_with_key(CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES, HOOK_KEY, take_hook_patches)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, HOOK_KEY, _hook_wrapper)

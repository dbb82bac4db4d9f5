"""Load a QuantSparse compressed checkpoint as ComfyUI's own model for it (HunyuanVideo or WanModel).

ComfyUI builds its model class from the checkpoint (`load_diffusion_model_state_dict`) with
our custom operations: every Linear is created without allocating a weight, and becomes either a
plain ComfyUI linear (bf16 tensors of the file) or a quantized linear (the file's packed integer
weights, computed by quantsparse_core's QuantLinear) when the state dict is loaded. ComfyUI's model
management (offloading, reloading, memory accounting) then works on the real stored bytes.

A quantized linear also behaves like a ComfyUI weight where users expect it (docs/LORA.md):
- LoRA: its state dict has an empty `<layer>.weight` entry, so ComfyUI's LoRA loaders map and
  accept LoRA keys for it (keys matching no layer keep ComfyUI's "lora key not loaded" warning).
  The weights stay packed: each layer runs the LoRAs of the loaded patcher, and the hook LoRAs of the
  conditioning a call runs, as low-rank side paths added to the quantized GEMM's output (lora_side.py);
- offload: a layer ComfyUI left on another device than its input runs on copies of its tensors made
  for that call (no module is rebuilt);
- save: ComfyUI's checkpoint format cannot hold the packed layers, so ModelSave / CheckpointSave of
  a compressed MODEL stop with a message naming the file to use instead.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
from pathlib import Path

import torch

from quantsparse_core.io.checkpoint import read_compressed
from quantsparse_core.models.family import family_of
from quantsparse_core.quant.linear import QuantizedInput, QuantLinear

from . import lora_side
from .instance_patches import forward_patched
from .lora_side import SidePaths

SUBFOLDER = "quantsparse"  # inside ComfyUI's diffusion_models folder
_UNET_PREFIX = lora_side.UNET_PREFIX
COMFY_CLASS = {"hunyuan_video": "HunyuanVideo", "wan": "WanModel"}  # by models/family.py name
# Float weights ComfyUI's detection reads the shape of (comfy/model_detection.py), by family: where the file holds
# such a layer packed, the loader passes a meta tensor of that shape beside it (no memory; our Linear ignores it).
DETECTION_WEIGHTS = {"wan": {"blocks.0.ffn.0.weight": lambda c: (c.ffn_dim, c.dim)}}

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

    def forward(self, x, start: int, end: int, side=None):
        return self.q.forward_rows(x, start, end, side)


def _run_on_copies(q: QuantLinear, x, device, rows=None, side=None):
    """q(x, side) (or q.forward_rows(x, *rows, side)) with q's tensors copied to `device` for this call only: a
    layer ComfyUI offloaded runs where its input is, with the same math (so the same output) as if it
    had been moved there."""
    tensors = {k: t.to(device, copy=True) for k, t in itertools.chain(q.named_parameters(), q.named_buffers())}
    try:
        if rows is None:
            return torch.func.functional_call(q, tensors, (x,), {"side": side})
        return torch.func.functional_call(_Rows(q), {f"q.{k}": t for k, t in tensors.items()}, (x, *rows, side))
    finally:
        q._kernel_state = None  # the kernel layout made from the copies must not stay on the device


LORA_FLOAT_INPUT_ENV = "QUANTSPARSE_LORA_FLOAT_INPUT"


def lora_on_float_input() -> bool:
    """QUANTSPARSE_LORA_FLOAT_INPUT=1: LoRAs on quantized layers take the float activation (exact LoRA term;
    the fused blocks then do not quantize those layers' inputs for them: slower) instead of the int8 codes
    the layer itself runs on (the default: the LoRA's term carries the activation quantization error, as a
    LoRA merged before compression would)."""
    return os.environ.get(LORA_FLOAT_INPUT_ENV, "").strip() not in ("", "0")


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
                self.side_paths = SidePaths()   # LoRAs beside the packed weight (lora_side.py)
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

            @property
            def lora(self):
                """The LoRA side path parts in use (None: none)."""
                return self.side_paths.active

            def input_quant_spec(self, x):
                """QuantLinear.input_quant_spec of the quantized layer where it runs beside x (the fused
                blocks' producers then hand forward() a QuantizedInput; our LoRA side paths take it too,
                unless lora_on_float_input());
                None: pass x as it is, also where ComfyUI's bypass LoRA replaced forward on the instance
                (it needs the float input)."""
                q = self.quant
                if q is None or forward_patched(self) or q.w_packed.device != x.device \
                        or (self.lora is not None and lora_on_float_input()):
                    return None
                return q.input_quant_spec(x)

            def forward(self, x, *args, **kwargs):
                if self.quant is None:
                    return super().forward(x, *args, **kwargs)
                q = self.quant
                device = x.codes.device if isinstance(x, QuantizedInput) else x.device
                side = None if self.lora is None else self.side_paths.low_rank(x)
                return q(x, side=side) if q.w_packed.device == device else _run_on_copies(q, x, device, side=side)

            @property
            def forward_rows(self):
                """(x, start, end) -> forward(x)[..., start:end] computing only those output features
                (fusion.single_block_fused: linear1's q/k/v before attention, its MLP part per token
                chunk after it), or None where that would cost the whole output: a plain layer, or
                one whose forward ComfyUI replaced (bypass LoRA)."""
                if self.quant is None or forward_patched(self):
                    return None
                return self._forward_rows

            def _forward_rows(self, x, start: int, end: int):
                q = self.quant
                device = x.codes.device if isinstance(x, QuantizedInput) else x.device
                side = None if self.lora is None else self.side_paths.low_rank(x)
                return (q.forward_rows(x, start, end, side) if q.w_packed.device == device
                        else _run_on_copies(q, x, device, rows=(start, end), side=side))

    return QuantSparseOps


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
    lora_side.attach(patcher)
    patcher.add_object_patch("state_dict_for_saving", _refuse_save(path))
    return patcher

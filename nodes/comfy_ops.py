"""Load a QuantSparse compressed checkpoint as ComfyUI's own HunyuanVideo model.

ComfyUI builds its HunyuanVideo class from the checkpoint (`load_diffusion_model_state_dict`) with
our custom operations: every Linear is created without allocating a weight, and becomes either a
plain ComfyUI linear (bf16 tensors of the file) or a quantized linear (the file's packed integer
weights, computed by quantsparse_core's QuantLinear) when the state dict is loaded. ComfyUI's model
management (offloading, reloading, memory accounting) then works on the real stored bytes.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from quantsparse_core.io.checkpoint import read_compressed
from quantsparse_core.quant.linear import QuantizedInput, QuantLinear

SUBFOLDER = "quantsparse"  # inside ComfyUI's diffusion_models folder
_UNET_PREFIX = "diffusion_model."


class _PrebuiltQuantLinear(QuantLinear):
    """A QuantLinear its parent built from the file; torch's recursive state-dict loading must leave
    it alone (the parent consumed the keys), or ComfyUI would log its buffers as missing."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        return


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
                    return
                if "weight" not in mine:
                    missing_keys.append(prefix + "weight")
                    return
                self.weight = torch.nn.Parameter(mine["weight"], requires_grad=False)
                if "bias" in mine:
                    self.bias = torch.nn.Parameter(mine["bias"], requires_grad=False)

            def input_quant_spec(self, x):
                """QuantLinear.input_quant_spec of the quantized layer where it runs beside x (the fused
                blocks' producers then hand forward() a QuantizedInput); None: pass x as it is."""
                q = self.quant
                if q is None or q.w_packed.device != x.device:
                    return None
                return q.input_quant_spec(x)

            def forward(self, x, *args, **kwargs):
                if self.quant is None:
                    return super().forward(x, *args, **kwargs)
                q = self.quant
                device = x.codes.device if isinstance(x, QuantizedInput) else x.device
                if q.w_packed.device != device:  # offloaded by ComfyUI (low-VRAM): run on a copy
                    q = _PrebuiltQuantLinear.from_packed(
                        q.in_features, q.out_features, q.w_bits, q.a_bits, q.log_smooth is not None,
                        q.rotation, q.packed_tensors(), device=device)
                return q(x)

    return QuantSparseOps


def _supports_disable_dynamic(fn) -> bool:
    return "disable_dynamic" in inspect.signature(fn).parameters


def load_compressed_patcher(path, disable_dynamic: bool = True):
    """A ComfyUI ModelPatcher for the compressed checkpoint at `path` (validated first).

    Dynamic VRAM is disabled for this model by default: our quantized layers hold packed buffers that
    ComfyUI's dynamic loader has not been verified with. ComfyUI can rebuild the model later through
    `cached_patcher_init`, which calls this function again.
    """
    import comfy.sd

    path = Path(path)
    header, config, policy, tensors = read_compressed(path)
    ops = make_operations(header["layers"])
    kwargs = {"model_options": {"custom_operations": ops}}
    if _supports_disable_dynamic(comfy.sd.load_diffusion_model_state_dict):
        kwargs["disable_dynamic"] = disable_dynamic
    patcher = comfy.sd.load_diffusion_model_state_dict(tensors, **kwargs)
    if patcher is None or type(patcher.model.diffusion_model).__name__ != "HunyuanVideo":
        raise ValueError(f"ComfyUI did not recognise {path} as a HunyuanVideo model; re-create the checkpoint "
                         "with QuantSparse Calibrate")
    patcher.cached_patcher_init = (load_compressed_patcher, (str(path),))
    patcher.quantsparse_header = header
    return patcher

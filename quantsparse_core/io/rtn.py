"""Round-to-nearest compression of a ComfyUI-format state dict, one linear at a time, for any family
(models/family.py). No calibration data: the fast baseline, and the path for the variants whose conditioning
calibration does not capture (Wan 2.2 TI2V 5B, distilled HunyuanVideo 1.5).

Memory: the source weights stay where they are (a ComfyUI MODEL's offloaded bf16 tensors, or a file's);
only one layer's float32 copy exists at a time (a 5120 x 13824 Wan-14B FFN: 283 MB), quantized on
`device` and kept packed (0.26x of bf16 for Wan-14B at W4A8) until the atomic save.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..models.family import HUNYUAN_VIDEO, family_of_state_dict
from ..models.weights import check_state_dict
from ..quant.linear import QuantLinear
from ..quant.policy import default_policy
from .checkpoint import CheckpointError, require_loadable, save_compressed


def quantize_state_dict(sd: Mapping, w_bits: int = 4, a_bits: int = 8, device="cpu",
                        progress: Optional[Callable[[int, int], None]] = None):
    """(the family's DiT with frozen W{w_bits}A{a_bits} QuantLinears on the CPU, its policy, its config).

    `sd` maps ComfyUI key names to tensors (any dtype, any device; a lazy Mapping works: each value is read
    once, and its `shapes` attribute, if any, stands in for it where only shapes are read). `progress(done, total)` is called after each quantized layer and may raise to stop."""
    shapes = getattr(sd, "shapes", sd)  # a lazy Mapping may offer tensors of the same shapes that cost nothing to read
    family, config = family_of_state_dict(shapes)
    try:
        require_loadable(config)
    except CheckpointError as e:
        raise ValueError(f"cannot compress this model: {e}") from None
    model = family.build(config, device="meta")
    if family is HUNYUAN_VIDEO:  # Wan's reader already checked every key and shape
        check_state_dict(model, shapes)
    policy = default_policy(model, w_bits, a_bits)
    named = dict(model.named_modules())
    for i, (name, rule) in enumerate(policy.items()):
        lin = named[name]
        bias = sd.get(f"{name}.bias") if lin.bias is not None else None
        src = nn.Linear(lin.in_features, lin.out_features, bias=bias is not None, device="meta")
        src.weight = nn.Parameter(sd[f"{name}.weight"].to(device=device, dtype=torch.float32), requires_grad=False)
        if bias is not None:
            src.bias = nn.Parameter(bias.to(device=device, dtype=torch.float32), requires_grad=False)
        q = QuantLinear(src, rule.w_bits, rule.a_bits).freeze().to("cpu")
        parent_name, _, child = name.rpartition(".")
        setattr(named[parent_name] if parent_name else model, child, q)
        del src
        if progress is not None:
            progress(i + 1, len(policy))
    prefixes = tuple(n + "." for n in policy)
    # bf16 is what the file stores for every tensor outside the quantized layers
    rest = {k: sd[k].to("cpu", torch.bfloat16) for k in model.state_dict() if not k.startswith(prefixes)}
    model.load_state_dict(rest, strict=False, assign=True)
    return model.eval(), policy, config


def compress_rtn(sd: Mapping, out_path, w_bits: int = 4, a_bits: int = 8, device="cpu",
                 source_hash: Optional[str] = None, progress: Optional[Callable[[int, int], None]] = None):
    """Quantize `sd` round-to-nearest and save the compressed checkpoint atomically; returns its header
    config's variant. A stop (an exception from `progress`) leaves no file behind."""
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"output name must end in .safetensors, got {out_path.name!r}")
    model, policy, config = quantize_state_dict(sd, w_bits, a_bits, device=device, progress=progress)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_compressed(model, out_path, policy, source_hash=source_hash,
                    calibration={"settings": {"method": "rtn", "w_bits": w_bits, "a_bits": a_bits}})
    return config.variant

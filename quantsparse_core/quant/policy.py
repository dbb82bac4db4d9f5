"""Which linear gets which quantization: a plain dict {module name: LayerRule}, stored in the
checkpoint header, so the policy is data rather than code scattered through the model.

Defaults (METHOD.md §1): every linear of the dual and single blocks at W/A bits; the adaLN
modulation linears weight-only (27% of HunyuanVideo-13B's weight bytes, no compute: M = 1); the
embedders, token refiner and final layer stay bf16. HunyuanVideo 1.5's input-side additions (byt5_in,
vision_in, time_r_in, cond_type_embedding: ~15M of 8.3B weights, run once per call on a few hundred
tokens) stay bf16 too: rounding them would shift every conditioning token for no measurable saving.
The rule is by name, so any block count works (1.5: 54 double blocks, no single blocks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .quantizers import check_bits

BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")
MODULATION_SUFFIXES = ("_mod.lin", "modulation.lin")
REFINER_PREFIX = "txt_in.individual_token_refiner."


@dataclass(frozen=True)
class LayerRule:
    w_bits: int
    a_bits: int  # 16 = weight-only

    def __post_init__(self):
        check_bits(self.w_bits, self.a_bits)


def default_policy(model: nn.Module, w_bits: int = 4, a_bits: int = 8,
                   modulation_w_bits: int | None = None, refiner_w_bits: int | None = None) -> dict:
    """{linear name: LayerRule} of the model's family (models/family.py): HunyuanVideo's rules below, Wan's in
    models/wan_storage.py. The two optional widths are HunyuanVideo's; asking them of a Wan model is an error."""
    from ..models.family import HUNYUAN_VIDEO, family_of
    fam = family_of(model)
    if fam is not HUNYUAN_VIDEO:
        if modulation_w_bits or refiner_w_bits:
            raise ValueError(f"modulation_w_bits / refiner_w_bits are HunyuanVideo layer rules; a {fam.title} "
                             "model has no such linears")
        check_bits(w_bits, a_bits)
        return fam.policy(model, w_bits, a_bits)
    return hunyuan_policy(model, w_bits, a_bits, modulation_w_bits, refiner_w_bits)


def hunyuan_policy(model: nn.Module, w_bits: int = 4, a_bits: int = 8,
                   modulation_w_bits: int | None = None, refiner_w_bits: int | None = None) -> dict:
    """HunyuanVideo: {linear name: LayerRule} for the blocks' linears; names not listed stay in bf16.

    refiner_w_bits: also store the token refiner's linears weight-only (it runs on the ~256 text
    tokens, so it costs no compute, but holds 0.53 GB of HunyuanVideo-13B's bf16 weights)."""
    check_bits(w_bits, a_bits)
    policy = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if refiner_w_bits and name.startswith(REFINER_PREFIX):
            policy[name] = LayerRule(refiner_w_bits, 16)
            continue
        if not name.startswith(BLOCK_PREFIXES):
            continue
        if name.endswith(MODULATION_SUFFIXES):
            policy[name] = LayerRule(modulation_w_bits or w_bits, 16)
        else:
            policy[name] = LayerRule(w_bits, a_bits)
    return policy


def policy_to_json(policy: dict) -> dict:
    return {name: asdict(rule) for name, rule in policy.items()}


def policy_from_json(data: dict) -> dict:
    try:
        return {name: LayerRule(**rule) for name, rule in data.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid layer policy in checkpoint header: {e}") from None


def _weight_bytes(out_f: int, in_f: int, bits: int) -> int:
    return out_f * (in_f // 2 if bits == 4 else in_f)  # int4 packed two per byte; int6/int8 one byte


def storage_bytes(model: nn.Module, policy: dict, scale_bytes: int = 4, float_bytes: int = 2) -> dict:
    """Bytes of a compressed checkpoint (tensor payload; the JSON header is a few KB): quantized
    weights packed, one fp32 scale per output channel, everything else in bf16. Works on a model
    built on the meta device, so the 13B figure needs no memory."""
    quant = dense = 0
    named = dict(model.named_modules())
    for name in policy:
        if not isinstance(named.get(name), nn.Linear):
            raise ValueError(f"policy names {name!r}, which is not a linear layer of this model")
    for pname, p in model.named_parameters():
        owner, _, leaf = pname.rpartition(".")
        rule = policy.get(owner)
        if rule is not None and leaf == "weight":
            quant += _weight_bytes(p.shape[0], p.shape[1], rule.w_bits) + p.shape[0] * scale_bytes
        else:
            dense += p.numel() * float_bytes
    total_float = sum(p.numel() for p in model.parameters()) * float_bytes
    return {"quantized": quant, "float": dense, "total": quant + dense, "bf16_total": total_float,
            "ratio": total_float / (quant + dense)}


def quantize_model(model: nn.Module, policy: dict, smooth: bool = False, rotation: str | None = None) -> nn.Module:
    """Replace each linear named in `policy` by a QuantLinear (fake mode) in place; returns model."""
    from .linear import QuantLinear

    named = dict(model.named_modules())
    for name, rule in policy.items():
        lin = named.get(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"policy names {name!r}, which is not a linear layer of this model")
        parent_name, _, child = name.rpartition(".")
        parent = named[parent_name] if parent_name else model
        weight_only = rule.a_bits == 16
        setattr(parent, child, QuantLinear(lin, rule.w_bits, rule.a_bits, smooth=smooth and not weight_only,
                                           rotation=None if weight_only else rotation))
    return model

"""The model-family seam: the one place that says what differs between HunyuanVideo and Wan for
compression (config type, DiT class, the variants a compressed file may hold, the layer policy, how a
ComfyUI-format state dict is read). Everything else (quantized linears, the checkpoint layout, SSAR,
the attention routing) is shared and asks this module instead of naming a model.

Attention calls are not listed here: both DiTs route every sparse-able attention through
RoutedAttention with an AttentionCall (HunyuanVideo: joint text + video; Wan: video only, txt_len 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .config import I2V, T2V, V15, DiTConfig, config_from_state_dict
from .hunyuan_video import HunyuanVideoDiT
from .wan import WAN_VARIANTS, WanConfig, WanDiT, wan_config_from_state_dict


@dataclass(frozen=True)
class ModelFamily:
    name: str                  # the checkpoint header's 'model_family'
    title: str                 # for messages
    config_type: type
    model_type: type
    loadable: tuple            # config.variant values a compressed checkpoint may hold
    policy: Callable           # (model, w_bits, a_bits) -> {linear name: LayerRule}
    config_from_state_dict: Callable  # ComfyUI-format state dict -> config (ValueError if not this family)

    def build(self, config, device=None, dtype=None) -> nn.Module:
        return self.model_type(config, device=device, dtype=dtype)

    @property
    def loadable_text(self) -> str:
        return ", ".join(self.loadable)


def _hunyuan_policy(model, w_bits, a_bits):
    from ..quant.policy import hunyuan_policy
    return hunyuan_policy(model, w_bits, a_bits)


def _wan_policy(model, w_bits, a_bits):
    from .wan_storage import wan_policy
    return wan_policy(model, w_bits, a_bits)


HUNYUAN_VIDEO = ModelFamily("hunyuan_video", "HunyuanVideo", DiTConfig, HunyuanVideoDiT, (T2V, I2V, V15),
                            _hunyuan_policy, config_from_state_dict)
WAN = ModelFamily("wan", "Wan", WanConfig, WanDiT, WAN_VARIANTS, _wan_policy, wan_config_from_state_dict)
FAMILIES = {f.name: f for f in (HUNYUAN_VIDEO, WAN)}


def family_of(obj) -> ModelFamily:
    """The family of a DiT, a config, or a family name; ValueError for anything else."""
    if isinstance(obj, str):
        if obj in FAMILIES:
            return FAMILIES[obj]
        raise ValueError(f"unknown model family {obj!r}; QuantSparse knows {sorted(FAMILIES)}")
    for fam in FAMILIES.values():
        if isinstance(obj, (fam.config_type, fam.model_type)):
            return fam
    config = getattr(obj, "config", None)
    if config is not None and not isinstance(config, dict):
        return family_of(config)
    raise ValueError(f"{type(obj).__name__} is not a QuantSparse DiT or config (HunyuanVideo or Wan)")


def family_of_state_dict(sd) -> tuple:
    """(family, config) of a ComfyUI-format diffusion-model state dict, by its keys: Wan files have
    'head.modulation', HunyuanVideo files 'img_in.proj.weight'. ValueError naming both otherwise."""
    if "head.modulation" in sd:
        return WAN, WAN.config_from_state_dict(sd)
    if "img_in.proj.weight" in sd:
        return HUNYUAN_VIDEO, HUNYUAN_VIDEO.config_from_state_dict(sd)
    raise ValueError("this state dict is neither a HunyuanVideo nor a Wan transformer in ComfyUI's key format "
                     "(no 'img_in.proj.weight' or 'head.modulation'); QuantSparse compresses those two families")

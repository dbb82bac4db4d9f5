"""HunyuanVideo- and Wan-architecture DiTs (ComfyUI key names), presets, embedded tiny model, sampler."""
from .attention import AttentionCall, StepInfo, dense_attention
from .config import DiTConfig, PRESETS, config_from_state_dict, get_preset
from .hunyuan_video import HunyuanVideoDiT
from .wan import WAN_PRESETS, WanConfig, WanDiT, get_wan_preset, wan_config_from_state_dict

__all__ = ["AttentionCall", "StepInfo", "dense_attention", "DiTConfig", "PRESETS", "config_from_state_dict",
           "get_preset", "HunyuanVideoDiT", "WAN_PRESETS", "WanConfig", "WanDiT", "get_wan_preset",
           "wan_config_from_state_dict"]

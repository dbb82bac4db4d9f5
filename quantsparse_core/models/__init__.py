"""HunyuanVideo-architecture DiT (ComfyUI key names), presets, embedded tiny model, sampler."""
from .attention import AttentionCall, StepInfo, dense_attention
from .config import DiTConfig, PRESETS, config_from_state_dict, get_preset
from .hunyuan_video import HunyuanVideoDiT

__all__ = ["AttentionCall", "StepInfo", "dense_attention", "DiTConfig", "PRESETS", "config_from_state_dict",
           "get_preset", "HunyuanVideoDiT"]

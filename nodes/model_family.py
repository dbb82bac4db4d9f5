"""Which model a MODEL is (ComfyUI's HunyuanVideo family, or a plain Wan transformer), and refusing the ones a
node does not support.

ComfyUI runs HunyuanVideo 1.0 T2V and I2V, SkyReels I2V, HunyuanVideo 1.5 (and its super-resolution
model) and HunyuanImage 2.1 (and its refiner) on one class, comfy.ldm.hunyuan_video.model.HunyuanVideo;
only the configuration it was built with tells them apart (comfy/model_detection.py reads it from the
state dict, comfy/supported_models.py names the variants by it). So the class name proves nothing: we
read the configuration. Wan: ComfyUI's plain WanModel runs Wan 2.1 T2V/I2V and the Wan 2.2 A14B experts and
TI2V-5B; VACE, camera, S2V, HuMo, Animate and the other Wan-based models are subclasses, refused by name.
"""
from __future__ import annotations

import torch

from quantsparse_core.models.wan import WAN21_I2V, WAN22_I2V, WAN22_TI2V, WAN_T2V, wan_variant

T2V = "HunyuanVideo 1.0 T2V"
I2V = "HunyuanVideo 1.0 I2V"
SKYREELS_I2V = "SkyReels I2V"
V15 = "HunyuanVideo 1.5 T2V/I2V"
V15_SR = "HunyuanVideo 1.5 super-resolution"
IMAGE21 = "HunyuanImage 2.1"
IMAGE21_REFINER = "HunyuanImage 2.1 refiner"

# What each node has been built and tested for. Calibration takes 16-channel text-to-video latents and
# text conditioning only; the sparse patch and the fused blocks see only the joint blocks' token layout,
# which 1.0 I2V shares (image channels concatenated to the latent, or the first frame replaced). 1.5
# (T2V and I2V: one model) joins [image tokens, byT5 tokens, text tokens, video tokens]: the sparse
# patch counts everything before the video grid as text (always-dense rows and columns), so it is
# sparse-patched too; its double blocks are 1.0's, so the fused form runs them too. A
# compressed checkpoint (RTN or calibrated) of 1.0 I2V or 1.5 loads as ComfyUI's own model for it.
# Wan: every plain Wan transformer's self-attention covers the video tokens only (sparse patch), and a
# compressed Wan checkpoint loads as ComfyUI's WanModel; the fused blocks cover HunyuanVideo's double/single blocks
# (1.5's double blocks are 1.0's: = ComfyUI's to 1.8e-7, tests/test_comfy_v15_sparse.py) and Wan's attention blocks
# (fused_wan.py).
WAN = (WAN_T2V, WAN21_I2V, WAN22_I2V, WAN22_TI2V)
# QuantSparse Calibrate: every method (MSAD, streamed block by block) where the calibration captures the whole
# conditioning; the others round-to-nearest only (method rtn, one linear at a time): TI2V's per-frame timesteps
# are not captured yet.
COMPRESS = (T2V, I2V, V15, WAN_T2V, WAN21_I2V, WAN22_I2V)  # image channels / byT5 / CLIP tokens: ComfyUI's conds
RTN_ONLY = (WAN22_TI2V,)
SPARSE = (T2V, I2V, *WAN, V15)
FUSED = (T2V, I2V, V15, *WAN)
LOAD = (T2V, I2V, V15, *WAN)

# DiTConfig.variant (the core's name for a checkpoint header's model) -> the name classify() gives it here.
FROM_CONFIG = {"HunyuanVideo 1.0 T2V": T2V, "HunyuanVideo 1.0 I2V": I2V, "HunyuanVideo 1.5": V15,
               **{v: v for v in WAN}}
T2V_SOURCE = ("for 1.0 T2V: ComfyUI's hunyuan_video_t2v_720p_bf16.safetensors, or a checkpoint QuantSparse Calibrate "
              "wrote from it")

# comfy/supported_models.py: the 1.0 family differs only in img_in's input channels.
_V10_BY_CHANNELS = {16: T2V, 33: I2V, 32: SKYREELS_I2V}
_V15_SR_CHANNELS = 98


def diffusion_model(model):
    """The diffusion module of a ComfyUI ModelPatcher (or the module itself)."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    return model if inner is None else inner


def classify(model) -> str:
    """The variant of a ModelPatcher's (or a diffusion module's) model, by ComfyUI's configuration."""
    dm = diffusion_model(model)
    name = type(dm).__name__
    if name == "WanModel":
        return classify_wan(dm)
    params = getattr(dm, "params", None)
    if name != "HunyuanVideo" or params is None:
        return f"{name} (not a HunyuanVideo-family model)"
    patch = list(params.patch_size)
    if len(patch) == 2:
        return IMAGE21
    if params.vision_in_dim is not None or params.use_cond_type_embedding:
        return V15_SR if params.in_channels == _V15_SR_CHANNELS else V15
    if patch == [1, 1, 1] and params.vec_in_dim is None:
        return IMAGE21_REFINER
    if patch == [1, 2, 2] and params.vec_in_dim is not None and params.out_channels == 16 \
            and not (params.byt5 or params.meanflow):
        variant = _V10_BY_CHANNELS.get(params.in_channels)
        if variant is not None:
            return variant
    return (f"an unknown HunyuanVideo configuration (in_channels {params.in_channels}, patch {patch}, "
            f"byT5 {params.byt5}, meanflow {params.meanflow})")


def classify_wan(dm) -> str:
    """The variant of ComfyUI's plain WanModel, from the attributes its constructor stores."""
    if getattr(dm, "ref_conv", None) is not None:
        return "Wan Fun (reference image)"
    return wan_variant(dm.model_type, dm.in_dim, dm.out_dim, dm.patch_size, dm.dim // dm.num_heads)


def require_supported(model, node_name: str, supported, hint: str = T2V_SOURCE) -> str:
    """The variant, or a ValueError naming the detected model and the variants `node_name` supports
    (`hint`: where to get a model it takes, in the message's closing brackets)."""
    variant = classify(model)
    if variant in supported:
        return variant
    base = getattr(model, "model", None)
    seen = f"{variant} (ComfyUI model class {type(base).__name__})" if isinstance(base, torch.nn.Module) else variant
    raise ValueError(f"{node_name} does not support this MODEL: it is {seen}. {node_name} supports "
                     f"{', '.join(supported)} ({hint})")

"""QuantSparse Calibrate (MODEL -> compressed MODEL + checkpoint) and Load Compressed DiT."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from comfy_api.latest import io

from quantsparse_core.calib.calibrate import METHODS, CalibSettings
from quantsparse_core.calib.capture import n_trajectories
from quantsparse_core.calib.block_source import StateDictSource
from quantsparse_core.calib.pipeline import SAMPLES_PER_TRAJECTORY, Conditioning
from quantsparse_core.calib.stream_budget import describe, estimate
from quantsparse_core.calib.stream_pipeline import WanSchedule, compress_streaming
from quantsparse_core.calib.wan_calibration import WanConditioning
from quantsparse_core.hostmem import available_host_memory, cached_pinned_bytes
from quantsparse_core.io.rtn import compress_rtn
from quantsparse_core.models.family import family_of

from .comfy_ops import SUBFOLDER, load_compressed_patcher
from .fused_blocks import apply_fused_blocks
from .model_family import (COMPRESS, FROM_CONFIG, FUSED, I2V, LOAD, RTN_ONLY, T2V, T2V_SOURCE, V15, WAN,
                           classify, require_supported)
from .sparse_patch import add_text_mask_batching

CATEGORY = "QuantSparse"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]{0,120}$")


def compressed_folder() -> Path:
    """models/diffusion_models/quantsparse (ComfyUI lists models/unet first, its legacy name; we prefer
    the current one when it is configured)."""
    import folder_paths
    paths = [Path(p) for p in folder_paths.get_folder_paths("diffusion_models")]
    preferred = [p for p in paths if p.name == "diffusion_models"]
    return (preferred or paths)[0] / SUBFOLDER


def compressed_files() -> list:
    """Checkpoints under diffusion_models/quantsparse/, as ComfyUI names them (subfolder/file)."""
    import folder_paths
    names = [n for n in folder_paths.get_filename_list("diffusion_models")
             if n.replace("\\", "/").startswith(SUBFOLDER + "/") and n.endswith(".safetensors")]
    return sorted(names)


def output_path(name: str) -> Path:
    """diffusion_models/quantsparse/<name>.safetensors, refusing names that would leave the folder."""
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"output name {name!r} is not a plain file name: use letters, digits, spaces, '_', '-' "
                         "and '.', without folders")
    return compressed_folder() / f"{name}.safetensors"


def conditioning_tensors(positive) -> Conditioning:
    """The first prompt of a CONDITIONING, as our DiT consumes it."""
    if not positive:
        raise ValueError("the positive conditioning is empty: connect a text encode node")
    tensor, extra = positive[0][0], positive[0][1]
    mask = extra.get("attention_mask")
    guidance = extra.get("guidance", 6.0)
    return Conditioning(tensor[:1].float().cpu().clone(), None if extra.get("pooled_output") is None
                        else extra["pooled_output"][:1].float().cpu().clone(),
                        None if mask is None else mask[:1].cpu().clone(), 6.0 if guidance is None else float(guidance))


FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, n))


def _refuse_compressed(dm) -> None:
    if any(getattr(m, "quant", None) is not None for m in dm.modules()):
        raise ValueError("this MODEL is already QuantSparse-compressed; calibrate the full-precision model")
    if any(k.endswith("comfy_quant") for k in dm.state_dict()):
        raise ValueError("this MODEL holds ComfyUI-quantized weights (an fp8_scaled / int8 mixed-precision file), "
                         "which QuantSparse cannot read back to full precision: load the bf16 or fp16 file of the "
                         "same model (e.g. wan2.1_t2v_14B_bf16.safetensors) with weight_dtype default and calibrate that")


def _readable(v: torch.Tensor, fp8_as=torch.bfloat16) -> torch.Tensor:
    """fp8 weights (UNETLoader weight_dtype fp8_*) as `fp8_as` (bf16 on a GPU, float32 on a CPU): calibration and
    rounding compute in float, and fp8 holds no more than bf16 does."""
    return v.to(fp8_as) if v.dtype in FLOAT8 else v


def _with_patch(patch, v: torch.Tensor, key: str, fp8_as=torch.bfloat16) -> torch.Tensor:
    import comfy.lora
    return comfy.lora.calculate_weight(patch, v.float().clone(), key).to(_readable(v, fp8_as).dtype)


EXPERT_ROLES = ("whole trajectory", "high noise", "low noise")


def wan_schedule(model, source, role: str, other_expert, boundary: float, fp8_as=torch.bfloat16) -> WanSchedule:
    """The Wan calibration schedule: the MODEL's sampling shift; for a Wan 2.2 expert, its sigma segment and
    the other expert running the remaining steps (refused where that expert is needed and missing)."""
    shift = sampling_shift(model)
    if role not in EXPERT_ROLES:
        raise ValueError(f"expert_role {role!r} unknown; use one of {', '.join(EXPERT_ROLES)}")
    if role == EXPERT_ROLES[0]:
        if other_expert is not None:
            raise ValueError("other_expert is connected but expert_role is 'whole trajectory': set expert_role to "
                             "the role of this MODEL (high noise or low noise), or disconnect other_expert")
        return WanSchedule(shift=shift)
    if not 0 < boundary < 1:
        raise ValueError(f"expert_boundary {boundary} must lie between 0 and 1 (Wan 2.2 T2V: 0.875)")
    high = role == "high noise"
    other = None
    if other_expert is not None:
        require_supported(other_expert, "QuantSparse Calibrate (other_expert)", COMPRESS)
        other = ComfyBlockSource(other_expert, fp8_as)
        if other.config != source.config:
            raise ValueError("other_expert is not the same architecture as this MODEL: connect the other Wan 2.2 "
                             "expert of the same model (high and low noise have identical shapes)")
    elif not high:
        raise ValueError("the low-noise expert's calibration inputs come from the high-noise expert's steps: connect "
                         "the high-noise expert's MODEL to other_expert")
    segment = (boundary, 2.0) if high else (0.0, boundary)
    expert = None if other is None else (lambda s: source if (s >= boundary) == high else other)
    return WanSchedule(shift=shift, sigma_range=segment, expert=expert)


def sampling_shift(model) -> float:
    """The flow shift the MODEL samples with (ModelSamplingSD3 patches it in), so calibration trajectories
    follow the user's schedule; Wan 2.1's default 8 where the MODEL has none."""
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else None
    shift = getattr(sampling, "shift", None)
    return float(shift) if isinstance(shift, (int, float)) and shift > 0 else 8.0


def comfy_conds(model, positive, latent: torch.Tensor, names) -> dict:
    """{name: tensor [1, ...] on the CPU} of the model inputs ComfyUI's own extra_conds makes from the first
    prompt's conditioning for a latent of `latent`'s shape (its scaling, resizing and mask handling), for the
    names it makes (c_concat: image + mask channels; txt_byt5, clip_fea: tokens)."""
    extra = dict(positive[0][1])
    for key in ("noise", "device", "cross_attn"):
        extra.pop(key, None)
    conds = model.model.extra_conds(noise=torch.zeros_like(latent[:1], dtype=torch.float32),
                                    device=torch.device("cpu"), cross_attn=positive[0][0][:1], **extra)
    return {n: conds[n].cond[:1].float().cpu().clone() for n in names if conds.get(n) is not None}


def hunyuan_image_channels(model, positive, latent: torch.Tensor) -> torch.Tensor:
    """HunyuanVideo 1.0 I2V's image latent + mask channels [1, 17, T, H, W], from what HunyuanImageToVideo
    ("v1 (concat)") set, through ComfyUI's HunyuanVideoI2V.concat_cond."""
    extra = positive[0][1]
    if "guiding_frame_index" in extra:
        raise ValueError("QuantSparse Calibrate: HunyuanImageToVideo's 'v2 (replace)' guidance writes the image into "
                         "the latent's first frame, which calibration trajectories (from pure noise) cannot "
                         "reproduce: calibrate with guidance_type 'v1 (concat)', or use method rtn")
    if extra.get("concat_latent_image") is None:
        raise ValueError("QuantSparse Calibrate: this HunyuanVideo 1.0 I2V MODEL needs its start image: feed the "
                         "prompt through HunyuanImageToVideo (guidance_type 'v1 (concat)') with a start_image")
    return comfy_conds(model, positive, latent, ("c_concat",))["c_concat"]


def hunyuan15_inputs(model, positive, latent: torch.Tensor):
    """HunyuanVideo 1.5's inputs besides the text: (image latent + mask channels [1, 33, T, H, W] (zeros for
    text-to-video), {"txt_byt5": the glyph byT5 tokens, "clip_fea": the image tokens} where the prompt has them)."""
    if latent.shape[1] != 32:
        raise ValueError(f"QuantSparse Calibrate: HunyuanVideo 1.5 takes its own 32-channel latent, got {latent.shape[1]} "
                         "channels: connect EmptyHunyuanVideo15Latent (or HunyuanVideo15ImageToVideo's latent)")
    conds = comfy_conds(model, positive, latent, ("c_concat", "txt_byt5", "clip_fea"))
    return conds.pop("c_concat"), conds or None


def wan_conditioning(model, positive, latent: torch.Tensor) -> WanConditioning:
    """The first prompt of a Wan CONDITIONING as WanDiT consumes it: umt5 tokens, and for image-to-video the CLIP
    image tokens and the mask + image-latent channels (ComfyUI's WAN21.extra_conds)."""
    if not positive:
        raise ValueError("the positive conditioning is empty: connect a text encode node (CLIPTextEncode with the "
                         "umt5 text encoder)")
    conds = comfy_conds(model, positive, latent, ("clip_fea", "c_concat"))
    cond = WanConditioning(positive[0][0][:1].float().cpu().clone(), conds.get("clip_fea"), conds.get("c_concat"))
    if model.model.diffusion_model.img_emb is not None and cond.clip_fea is None:
        raise ValueError("this Wan 2.1 image-to-video MODEL needs CLIP image tokens: feed the prompt through "
                         "WanImageToVideo with a CLIPVisionEncode output (clip_vision_output)")
    return cond


class ComfyWeights(Mapping):
    """A MODEL's diffusion-model weights by ComfyUI key, where ComfyUI keeps them (on the CPU once offloaded),
    with its LoRA / weight patches applied to each tensor as it is read (comfy.lora.calculate_weight)."""

    def __init__(self, model):
        dm = model.model.diffusion_model
        _refuse_compressed(dm)
        self.sd = dm.state_dict()
        self.shapes = self.sd  # the architecture is read from these (io/rtn.py) without computing a patched tensor
        self.patches = dict(model.patches)

    def __getitem__(self, key):
        v = self.sd[key]
        patch = self.patches.get(f"diffusion_model.{key}")
        return _readable(v) if patch is None else _with_patch(patch, v, f"diffusion_model.{key}")

    def __contains__(self, key):
        return key in self.sd

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


class ComfyBlockSource(StateDictSource):
    """The MODEL's weights where ComfyUI keeps them (on the CPU when offloaded), read one block at a time;
    LoRA / weight patches are applied to each block's copy as it is taken (comfy.lora.calculate_weight)."""

    def __init__(self, model, fp8_as=torch.bfloat16):
        dm = model.model.diffusion_model
        _refuse_compressed(dm)
        super().__init__(dm.state_dict())
        self.patches = dict(model.patches)
        self.fp8_as = fp8_as

    def on_block_read(self) -> None:
        """Cancel works while the source is fingerprinted (30-60 s for a 14B model)."""
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()

    def _patched(self, prefix: str, tensors: dict) -> dict:
        if not self.patches:
            return tensors
        out = {}
        for k, v in tensors.items():
            key = f"diffusion_model.{prefix}{k}"
            out[k] = v if key not in self.patches else _with_patch(self.patches[key], v, key, self.fp8_as)
        return out

    def tensors(self, kind, idx) -> dict:
        block = self._patched(self.block_prefix(kind, idx), super().tensors(kind, idx))
        return {k: _readable(v, self.fp8_as) for k, v in block.items()}

    def other_tensors(self) -> dict:
        return {k: _readable(v, self.fp8_as) for k, v in self._patched("", super().other_tensors()).items()}


class ProgressReporter:
    """ComfyUI progress bar over capture steps then calibration epochs; honours Cancel."""

    def __init__(self, capture_total: int, calib_total: int, capture_share: float = 0.1):
        import comfy.utils
        self.capture_total, self.total = capture_total, capture_total + calib_total
        self.bar = comfy.utils.ProgressBar(self.total)
        self.start, self.first, self.last_log = time.monotonic(), None, 0.0

    def eta(self, value: int) -> float | None:
        """Seconds left, from the rate since the first tick of this run (a resumed run skips work)."""
        now = time.monotonic()
        if self.first is None:
            self.first = (now, value)
            return None
        t0, v0 = self.first
        return None if value <= v0 else (now - t0) * (self.total - value) / (value - v0)

    def _tick(self, value: int) -> None:
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        value = min(value, self.total)
        self.bar.update_absolute(value, self.total)
        left = self.eta(value)
        if left is not None and time.monotonic() - self.last_log > 30:
            self.last_log = time.monotonic()
            logging.info("QuantSparse Calibrate: %.0f%% done, about %.0f min left", 100 * value / self.total, left / 60)

    def capture(self, trajectory: int, n_traj: int, step: int, steps: int) -> None:
        self._tick(int(self.capture_total * (trajectory + (step + 1) / steps) / n_traj))

    def calibration(self, block: int, n_blocks: int, epoch: int, epochs: int) -> None:
        self._tick(self.capture_total + int((self.total - self.capture_total) * (block + epoch / epochs) / n_blocks))


class Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = CalibSettings()
        return io.Schema(
            node_id="QuantSparseCalibrate", display_name="QuantSparse Calibrate", category=CATEGORY,
            description="Quantize a HunyuanVideo (1.0, 1.5) or Wan 2.1 / 2.2 model block by block with MSAD "
                        "calibration (Wan 2.2 TI2V 5B round-to-nearest only, method rtn), save the compressed "
                        "checkpoint to models/diffusion_models/quantsparse/, and return it as a MODEL. "
                        "An interrupted calibration resumes from its last finished block.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision MODEL to compress (LoRAs applied to it are baked "
                                                "in): HunyuanVideo 1.0 T2V / I2V (prompt through HunyuanImageToVideo "
                                                "'v1 (concat)') or Wan 2.1 / 2.2 T2V / I2V (prompt through "
                                                "WanImageToVideo) with any method; HunyuanVideo 1.5 and Wan TI2V 5B "
                                                "with method rtn (prompt and latent unused); other models are refused"),
                io.Conditioning.Input("positive", tooltip="A typical prompt: calibration data are sampling "
                                                          "trajectories of this prompt"),
                io.Latent.Input("latent", tooltip="An empty latent of the size you will generate at "
                                                  "(EmptyHunyuanLatentVideo): calibration runs at this size. "
                                                  "A smaller one (fewer frames, lower resolution) is allowed "
                                                  "and faster; see docs/CALIBRATION.md"),
                io.Combo.Input("weight_bits", options=["4", "6", "8"], default=str(d.w_bits),
                               tooltip="Bits per weight (4 = 3.7x smaller than bf16)"),
                io.Combo.Input("activation_bits", options=["8", "6", "16"], default=str(d.a_bits),
                               tooltip="Bits per activation (16 = weight-only quantization)"),
                io.Combo.Input("method", options=list(METHODS), default=d.method,
                               tooltip="msad: block loss + global + local attention distillation (the paper). "
                                       "The others are baselines: rtn (no calibration), smoothquant, quarot, block, "
                                       "block+global, block+local"),
                io.Int.Input("samples", default=20, min=1, max=200,
                             tooltip="Calibration samples (model calls) spread over the whole schedule (paper: 20)"),
                io.Int.Input("steps", default=20, min=2, max=200,
                             tooltip="Steps of the sampling trajectories the samples are taken from"),
                io.Int.Input("epochs", default=d.epochs, min=1, max=100, tooltip="Training epochs per block (paper: 15)"),
                io.Float.Input("lambda_global", default=d.lambda_g, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the global (pooled) attention distillation term, after "
                                       "auto-balancing to the block loss"),
                io.Float.Input("lambda_local", default=d.lambda_l, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the local (salient rows) attention distillation term"),
                io.Int.Input("pool_stride", default=d.stride, min=1, max=4096,
                             tooltip="Token pooling stride of the global attention map (paper: 128)"),
                io.Int.Input("salient_tokens", default=d.top_k, min=1, max=65536,
                             tooltip="Rows of the local attention map: the tokens that receive most attention "
                                     "(paper: 256)"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the calibration trajectories and of training"),
                io.String.Input("output_name", default="hunyuan_video_quantsparse_w4a8",
                                tooltip="File name under models/diffusion_models/quantsparse/ (.safetensors added)"),
                # optional and last: workflows saved before them load unchanged (whole trajectory)
                io.Combo.Input("expert_role", options=list(EXPERT_ROLES), default=EXPERT_ROLES[0], optional=True,
                               tooltip="Wan 2.2 A14B: which expert this MODEL is. Its samples then come from the "
                                       "steps it serves (sigma at or above expert_boundary: high noise; below: low "
                                       "noise), on trajectories where other_expert runs the other steps. whole "
                                       "trajectory: a single model (HunyuanVideo, Wan 2.1)."),
                io.Model.Input("other_expert", optional=True,
                               tooltip="Wan 2.2 A14B: the other expert's full-precision MODEL (needed for the low-noise "
                                       "expert, whose inputs the high-noise one produces)"),
                io.Float.Input("expert_boundary", default=0.875, min=0.01, max=0.999, step=0.005, optional=True,
                               tooltip="Wan 2.2 A14B: the sigma where sampling switches from the high-noise to the "
                                       "low-noise expert (0.875 for T2V, 0.9 for I2V, as Wan 2.2's own pipeline)"),
            ],
            outputs=[io.Model.Output(tooltip="The compressed model, loaded like Load Compressed DiT would")],
            is_output_node=True,  # saving the checkpoint is the point: the node runs with nothing connected
        )

    @classmethod
    def execute(cls, model, positive, latent, weight_bits, activation_bits, method, samples, steps, epochs,
                lambda_global, lambda_local, pool_stride, salient_tokens, seed, output_name,
                expert_role=EXPERT_ROLES[0], other_expert=None, expert_boundary=0.875) -> io.NodeOutput:
        import comfy.model_management
        require_supported(model, "QuantSparse Calibrate", COMPRESS + RTN_ONLY,
                          hint=f"{T2V_SOURCE}; the others with method rtn")
        out = output_path(output_name)
        variant = classify(model)
        if variant not in WAN and (other_expert is not None or expert_role != EXPERT_ROLES[0]):
            raise ValueError(f"expert_role and other_expert are for Wan 2.2's two experts; this MODEL is {variant}: "
                             "set expert_role to 'whole trajectory' and disconnect other_expert")
        if variant in RTN_ONLY or (method == "rtn" and variant != T2V):  # rtn needs no data: one linear at a time
            return cls.round_to_nearest(model, out, int(weight_bits), int(activation_bits), method)
        settings = CalibSettings(method=method, w_bits=int(weight_bits), a_bits=int(activation_bits), epochs=epochs,
                                 lambda_g=lambda_global, lambda_l=lambda_local, stride=pool_stride,
                                 top_k=salient_tokens, seed=seed % (2**31))
        lat = latent["samples"]
        if lat.ndim != 5:  # before anything is unloaded or estimated
            raise ValueError(f"QuantSparse Calibrate needs a video latent [batch, channels, frames, height, width], got "
                             f"shape {tuple(lat.shape)} (an image latent?): connect EmptyHunyuanLatentVideo, "
                             "EmptyHunyuanVideo15Latent or a Wan latent video node")
        # ComfyUI executes nodes under torch.inference_mode(); calibration trains (autograd), and
        # tensors created in inference mode cannot take part, so everything is copied in here.
        with torch.inference_mode(False), torch.enable_grad():
            wan = variant in WAN
            cond = wan_conditioning(model, positive, lat) if wan else conditioning_tensors(positive)
            if variant == I2V:
                cond.concat = hunyuan_image_channels(model, positive, lat)
            elif variant == V15:
                cond.concat, cond.tokens = hunyuan15_inputs(model, positive, lat)
            # ComfyUI keeps the weights (offloaded to the CPU once its models are unloaded); calibration
            # copies one block at a time to the GPU and never holds a float32 copy of the model.
            comfy.model_management.unload_all_models()
            comfy.model_management.soft_empty_cache()
            device = comfy.model_management.get_torch_device()
            fp8_as = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU trains without autocast
            source = ComfyBlockSource(model, fp8_as)
            schedule = wan_schedule(model, source, expert_role, other_expert, expert_boundary, fp8_as) if wan else None
            n_blocks = len(source.names())
            n_traj = n_trajectories(samples, SAMPLES_PER_TRAJECTORY)
            latent_shape = tuple(lat.shape[1:])
            est = estimate(source.config, latent_shape, cond.context.shape[1], samples, steps, settings)
            logging.info("QuantSparse Calibrate: %s", describe(est))
            gpu_free = comfy.model_management.get_free_memory(device) if device.type == "cuda" else None
            host = available_host_memory()
            if host is not None:  # pinned memory PyTorch keeps cached from an earlier run is ours to reuse
                host += cached_pinned_bytes()
            bar = ProgressReporter(n_traj * steps * 3, n_blocks * epochs)  # a capture call ~ 1/3 block epoch
            compress_streaming(source, cond, latent_shape, out, settings, n_samples=samples, steps=steps,
                               seed=seed % (2**31), device=device, amp=device.type == "cuda",
                               store_dtype=torch.bfloat16 if device.type == "cuda" else None,
                               gpu_budget=gpu_free, host_budget=None if host is None else host // 2,
                               capture_progress=lambda j, n, s: bar.capture(j, n, s, steps),
                               progress=lambda b, n, e, loss: bar.calibration(b, n, e, epochs),
                               wan_schedule=schedule)
            del source
        comfy.model_management.soft_empty_cache()
        return io.NodeOutput(load_compressed_patcher(out))

    @classmethod
    def round_to_nearest(cls, model, out: Path, w_bits: int, a_bits: int, method: str) -> io.NodeOutput:
        """HunyuanVideo 1.0 I2V, 1.5 and Wan: round-to-nearest, one linear at a time from the MODEL's weights
        (LoRAs baked in); the node's MSAD calibration takes 1.0 T2V's conditioning only so far."""
        import comfy.model_management
        import comfy.utils
        if method != "rtn":
            raise ValueError(f"QuantSparse Calibrate: method {method!r} is not available for {classify(model)} yet "
                             "(its conditioning is not captured by calibration yet); set method to rtn to write a "
                             "round-to-nearest checkpoint (no calibration data are used)")
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        weights = ComfyWeights(model)
        need = _rtn_host_bytes(weights, w_bits)
        host = available_host_memory()
        if host is not None and need > host:
            raise MemoryError(f"QuantSparse Calibrate (rtn) needs about {need / 2**30:.1f} GB of free host memory "
                              f"for the packed {w_bits}-bit model, {host / 2**30:.1f} GB are free: close other "
                              "programs or unload other models first")
        bar = comfy.utils.ProgressBar(1)

        def tick(done, total):
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        device = comfy.model_management.get_torch_device()
        with torch.inference_mode(False):
            variant = compress_rtn(weights, out, w_bits, a_bits, device=device, progress=tick)
        logging.info("QuantSparse Calibrate: %s W%dA%d round-to-nearest checkpoint written to %s", variant, w_bits,
                     a_bits, out)
        del weights
        comfy.model_management.soft_empty_cache()
        return io.NodeOutput(load_compressed_patcher(out))


def _rtn_host_bytes(weights: Mapping, w_bits: int) -> int:
    """Host bytes a round-to-nearest job holds until its save: the packed model (weights of 2-D tensors at
    w_bits, the rest bf16) plus the largest layer's float32 copy."""
    packed = sum(t.numel() * (w_bits / 8 if t.ndim == 2 else 2) for t in weights.sd.values())
    return int(packed + 4 * max(t.numel() for t in weights.sd.values()))


class LoadCompressedDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseLoadCompressedDiT", display_name="Load Compressed DiT (QuantSparse)", category=CATEGORY,
            description="Load a QuantSparse compressed HunyuanVideo 1.0 (T2V or I2V), HunyuanVideo 1.5 or Wan 2.1 / 2.2 "
                        "checkpoint as ComfyUI's own model for it (HunyuanVideo, HunyuanVideoI2V, HunyuanVideo15 "
                        "or WAN21 / WAN22).",
            inputs=[io.Combo.Input("checkpoint", options=compressed_files(),
                                   tooltip="Compressed checkpoints in models/diffusion_models/quantsparse/ "
                                           "(written by QuantSparse Calibrate, or by quantsparse_core's "
                                           "save_compressed)")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        import folder_paths
        path = folder_paths.get_full_path("diffusion_models", checkpoint)
        if path is None:
            raise ValueError(f"checkpoint {checkpoint!r} is not in models/diffusion_models/; refresh the node list")
        # The loader refuses files of a variant the format does not hold (1.5 super-resolution, SkyReels,
        # HunyuanImage 2.1) before ComfyUI builds anything.
        patcher = load_compressed_patcher(path)
        # ComfyUI builds whatever the file's keys describe: it must be a supported model, and the one the
        # header names (else ComfyUI's detection and ours disagree, and the file would run as another model).
        variant = require_supported(patcher, "Load Compressed DiT", LOAD,
                                    hint="compressed checkpoints QuantSparse wrote for them")
        header = patcher.quantsparse_header
        described = FROM_CONFIG.get(family_of(header["model_family"]).config_type.from_dict(header["config"]).variant)
        if described != variant:
            raise ValueError(f"ComfyUI built {checkpoint} as {variant}, but its QuantSparse header describes "
                             f"{described}: this ComfyUI detects these models differently; update ComfyUI "
                             "or QuantSparse")
        if variant in FUSED:
            # Fused blocks on: any sampler then runs the producer-quantized fast path (fused_blocks.py,
            # fused_wan.py).
            patcher = apply_fused_blocks(patcher)
        # cfg > 1 with a negative prompt of other padding, and batches: one [1, L] text mask per call.
        add_text_mask_batching(patcher)
        return io.NodeOutput(patcher)

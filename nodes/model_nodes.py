"""QuantSparse Calibrate (MODEL -> compressed MODEL + checkpoint) and Load Compressed DiT."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from comfy_api.latest import io

from quantsparse_core.calib.calibrate import METHODS, CalibSettings
from quantsparse_core.calib.capture import n_trajectories
from quantsparse_core.calib.pipeline import SAMPLES_PER_TRAJECTORY, Conditioning, compress

from .comfy_ops import SUBFOLDER, load_compressed_patcher
from .fused_blocks import apply_fused_blocks
from .sparse_patch import check_hunyuan_video

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


def diffusion_state_dict(model) -> dict:
    """The MODEL's weights in ComfyUI's key format on the CPU, with any LoRA/weight patches applied."""
    import comfy.model_management
    if any(getattr(m, "quant", None) is not None for m in model.model.diffusion_model.modules()):
        raise ValueError("this MODEL is already QuantSparse-compressed; calibrate the full-precision model")
    if model.patches:  # LoRAs etc.: let ComfyUI apply them, then read the patched weights
        comfy.model_management.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.model.diffusion_model.state_dict().items()}


class ProgressReporter:
    """ComfyUI progress bar over capture steps then calibration epochs; honours Cancel."""

    def __init__(self, capture_total: int, calib_total: int):
        import comfy.utils
        self.capture_total, self.total = capture_total, capture_total + calib_total
        self.bar = comfy.utils.ProgressBar(self.total)

    def _tick(self, value: int) -> None:
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(min(value, self.total), self.total)

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
            description="Quantize a HunyuanVideo model block by block with MSAD calibration, save the compressed "
                        "checkpoint to models/diffusion_models/quantsparse/, and return it as a MODEL. "
                        "An interrupted run resumes from its last finished block.",
            inputs=[
                io.Model.Input("model", tooltip="The full-precision HunyuanVideo MODEL to compress (LoRAs applied "
                                                "to it are baked in)"),
                io.Conditioning.Input("positive", tooltip="A typical prompt: calibration data are sampling "
                                                          "trajectories of this prompt"),
                io.Latent.Input("latent", tooltip="An empty latent of the size you will generate at "
                                                  "(EmptyHunyuanLatentVideo): calibration runs at this size"),
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
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the calibration trajectories and of training"),
                io.String.Input("output_name", default="hunyuan_video_quantsparse_w4a8",
                                tooltip="File name under models/diffusion_models/quantsparse/ (.safetensors added)"),
            ],
            outputs=[io.Model.Output(tooltip="The compressed model, loaded like Load Compressed DiT would")],
            is_output_node=True,  # saving the checkpoint is the point: the node runs with nothing connected
        )

    @classmethod
    def execute(cls, model, positive, latent, weight_bits, activation_bits, method, samples, steps, epochs,
                lambda_global, lambda_local, pool_stride, salient_tokens, seed, output_name) -> io.NodeOutput:
        import comfy.model_management
        check_hunyuan_video(model)
        out = output_path(output_name)
        settings = CalibSettings(method=method, w_bits=int(weight_bits), a_bits=int(activation_bits), epochs=epochs,
                                 lambda_g=lambda_global, lambda_l=lambda_local, stride=pool_stride,
                                 top_k=salient_tokens, seed=seed % (2**31))
        lat = latent["samples"]
        # ComfyUI executes nodes under torch.inference_mode(); calibration trains (autograd), and
        # tensors created in inference mode cannot take part, so everything is copied in here.
        with torch.inference_mode(False), torch.enable_grad():
            cond = conditioning_tensors(positive)
            sd = diffusion_state_dict(model)
            n_blocks = sum(1 for k in sd if k.endswith(".img_attn.qkv.weight") or k.endswith(".linear1.weight"))
            n_traj = n_trajectories(samples, SAMPLES_PER_TRAJECTORY)
            bar = ProgressReporter(n_traj * steps, n_blocks * epochs)
            device = comfy.model_management.get_torch_device()
            comfy.model_management.unload_all_models()  # calibration needs the VRAM ComfyUI's models hold
            comfy.model_management.soft_empty_cache()
            compress(sd, cond, tuple(lat.shape[1:]), out, settings, n_samples=samples, steps=steps,
                     seed=seed % (2**31), device=device,
                     capture_progress=lambda j, n, s: bar.capture(j, n, s, steps),
                     progress=lambda b, n, e, loss: bar.calibration(b, n, e, epochs))
            del sd
        comfy.model_management.soft_empty_cache()
        return io.NodeOutput(load_compressed_patcher(out))


class LoadCompressedDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseLoadCompressedDiT", display_name="Load Compressed DiT (QuantSparse)", category=CATEGORY,
            description="Load a QuantSparse compressed HunyuanVideo checkpoint as ComfyUI's own HunyuanVideo model.",
            inputs=[io.Combo.Input("checkpoint", options=compressed_files(),
                                   tooltip="Compressed checkpoints in models/diffusion_models/quantsparse/ "
                                           "(written by QuantSparse Calibrate)")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, checkpoint) -> io.NodeOutput:
        import folder_paths
        path = folder_paths.get_full_path("diffusion_models", checkpoint)
        if path is None:
            raise ValueError(f"checkpoint {checkpoint!r} is not in models/diffusion_models/; refresh the node list")
        # Fused blocks on: any sampler then runs the producer-quantized fast path (fused_blocks.py).
        return io.NodeOutput(apply_fused_blocks(load_compressed_patcher(path)))

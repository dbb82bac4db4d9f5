"""Sparse Sampler (a KSampler with sparse attention + SSAR for its own run) and the MODEL patch
node for other samplers. Both share one set of settings inputs and nodes/sparse_patch.py."""
from __future__ import annotations

from comfy_api.latest import io

from quantsparse_core.sparse.cache import AUTO_ORDER
from quantsparse_core.sparse.ssar import SCHEDULES, SparseSettings

from .sparse_patch import apply_sparse

CATEGORY = "QuantSparse"
PLACEMENTS = ["auto", *AUTO_ORDER]
DENSE_ATTENTION = ("quantsparse", "comfyui")  # who runs the dense passes: SparseSettings.host_attention


def sparse_inputs() -> list:
    """The sparse-attention settings, defaults from the paper (METHOD.md §3-4)."""
    d = SparseSettings()
    return [
        io.Float.Input("density", default=d.density, min=0.01, max=1.0, step=0.01,
                       tooltip="Fraction of attention kept per head (0.15 = 15%, the paper's HunyuanVideo setting; on "
                               "Wan it applies to self-attention). "
                               "Lower is faster and less faithful; 1.0 is dense."),
        io.Int.Input("refresh_interval", default=d.tau, min=1, max=100,
                     tooltip="Every this many steps, full attention is computed and the SSAR correction refreshed "
                             "(paper: 5). Shorter is more faithful and slower."),
        io.Int.Input("svd_rank", default=d.svd_rank, min=0, max=128,
                     tooltip="Rank of the SVD that denoises the second-order correction (paper: 16; 0 = no SVD). "
                             "At most the head dimension (128)."),
        io.Int.Input("warmup_steps", default=-1, min=-1, max=1000,
                     tooltip="Dense attention for the first steps. -1 = the first 10% of the run's steps "
                             "(Sparse VideoGen's HunyuanVideo setting). Fewer is faster: 2 of 50 steps made a "
                             "720p W4A8 run ~5% faster than 5, at a small fidelity cost (docs/RESULTS.md)."),
        io.Int.Input("warmup_blocks", default=d.warmup_blocks, min=0, max=100,
                     tooltip="Dense attention in the first transformer blocks (HunyuanVideo: double blocks first; "
                               "Wan: its blocks in order)."),
        io.Combo.Input("cache_placement", options=PLACEMENTS, default="auto",
                       tooltip="Where the SSAR correction cache lives. auto: the most accurate option that fits in "
                               "free VRAM (cpu-pinned only if free RAM holds it, leaving 4 GB). gpu-bf16 / gpu-int8: "
                               "on the GPU; cpu-pinned: in RAM, copied each step; low-rank: compressed, lossy. "
                               "720p x 129 frames needs 44 GB in bf16. The choice is logged at the first refresh."),
        io.Boolean.Input("fused_blocks", default=True, optional=True,  # optional: older saved prompts lack it
                         tooltip="Run QuantSparse's fused blocks (grouped small ops, activations quantized by the op "
                                 "that produces them, one q/k norm + RoPE kernel) on this model's weights instead of "
                                 "ComfyUI's block code: same math, faster on NVIDIA GPUs (measured on HunyuanVideo; "
                                 "Wan's are new). Off = ComfyUI's blocks."),
        # optional and last: saved prompts and workflows from before it load unchanged (schedule auto)
        io.Combo.Input("schedule", options=list(SCHEDULES), default=d.schedule, optional=True,
                       tooltip=f"Which steps get full attention. auto: few-step for runs of at most {d.few_step_max} "
                               "steps (4-8-step distilled models and LoRAs), else standard. standard: the dense "
                               "warm-up and refresh interval above. few-step: full attention on every other step "
                               "from the first, the first-order correction in between (ignores refresh interval and "
                               "warm-up steps). sparse-only: full attention on the first step, then sparse attention "
                               "with a fresh mask each step and no correction cache (least memory, less faithful)."),
        io.Boolean.Input("int8_attention", default=False, optional=True,
                         tooltip="Run the dense passes (warm-up steps, the first blocks, each refresh's full "
                                 "attention) with QuantSparse's INT8 Q.K^T (per-block scales, K smoothed) instead of "
                                 "bf16. Costs at most 0.16 dB on the tiny model (docs/RESULTS.md) but the kernel is "
                                 "only about as fast as cuDNN bf16 (0.91-1.04x on an H100, docs/BENCHMARKS.md): off by "
                                 "default, kept for experiments."),
        io.Combo.Input("dense_attention", options=list(DENSE_ATTENTION), default="quantsparse", optional=True,
                       tooltip="Who runs the dense passes (warm-up steps, the first blocks, each refresh's full "
                               "attention). quantsparse: cuDNN bf16 (or INT8 above). comfyui: the attention ComfyUI is "
                               "set to for this model, e.g. comfy kitchen's INT8 attention (--use-ck-attention, or a "
                               "Model Attention Backend node BEFORE this one); the sparse passes stay QuantSparse's."),
    ]


def sparse_settings(density, refresh_interval, svd_rank, warmup_steps, warmup_blocks, cache_placement,
                    schedule: str = "auto", int8_attention: bool = False,
                    dense_attention: str = "quantsparse") -> SparseSettings:
    """Node inputs -> SparseSettings; out-of-range values raise a ValueError naming the input."""
    if dense_attention not in DENSE_ATTENTION:
        raise ValueError(f"dense_attention must be one of {', '.join(DENSE_ATTENTION)}, got {dense_attention!r}")
    if svd_rank > 128:
        raise ValueError(f"svd_rank {svd_rank} exceeds the head dimension 128 of HunyuanVideo and Wan; use 0-128")
    return SparseSettings(density=density, tau=refresh_interval, svd_rank=svd_rank,
                          warmup_steps=None if warmup_steps < 0 else warmup_steps,
                          warmup_blocks=warmup_blocks, placement=cache_placement, schedule=schedule,
                          int8_attention=bool(int8_attention), host_attention=dense_attention == "comfyui")


class SparseAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseSparseAttention", display_name="QuantSparse Sparse Attention", category=CATEGORY,
            description="Sparse attention with second-order residual reuse (SSAR) for HunyuanVideo and Wan, as a "
                        "MODEL patch for any sampler (e.g. SamplerCustomAdvanced). The input MODEL stays dense. "
                        "Wan: the blocks' self-attention is made sparse, cross-attention stays dense.",
            inputs=[io.Model.Input("model", tooltip="A HunyuanVideo 1.0 or 1.5 T2V/I2V MODEL, or a Wan 2.1 "
                                                    "T2V/I2V or Wan 2.2 T2V/I2V (A14B) or TI2V 5B MODEL (full "
                                                    "precision or QuantSparse compressed); other models, VACE "
                                                    "and the other Wan-based ones included, are refused"),
                    *sparse_inputs()],
            outputs=[io.Model.Output(tooltip="The same model with sparse attention active while it samples")],
        )

    @classmethod
    def execute(cls, model, fused_blocks=True, **settings) -> io.NodeOutput:
        return io.NodeOutput(apply_sparse(model, sparse_settings(**settings), fused=fused_blocks,
                                          node_name="QuantSparse Sparse Attention"))


class SparseSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import comfy.samplers
        return io.Schema(
            node_id="QuantSparseSparseSampler", display_name="Sparse Sampler (QuantSparse)", category=CATEGORY,
            description="KSampler with sparse attention + SSAR active for this run only (HunyuanVideo 1.0 "
                        "and 1.5 T2V/I2V, Wan 2.1/2.2).",
            inputs=[
                io.Model.Input("model", tooltip="A HunyuanVideo 1.0 or 1.5 T2V/I2V MODEL, or a Wan 2.1 T2V/I2V or Wan 2.2 "
                                                "T2V/I2V (A14B) or TI2V 5B MODEL (full precision or QuantSparse "
                                                "compressed); other models, VACE and the other Wan-based ones "
                                                "included, are refused"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed of the initial noise"),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Denoising steps"),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; HunyuanVideo uses embedded guidance "
                                       "(FluxGuidance) with cfg 1.0; Wan uses real cfg (above 1) with the negative"),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampling algorithm"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="The noise schedule"),
                io.Conditioning.Input("positive", tooltip="What the video should show"),
                io.Conditioning.Input("negative", tooltip="What to avoid (used only when cfg > 1)"),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. EmptyHunyuanLatentVideo, or a Wan "
                                                         "latent video node's output)"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule to run; 1.0 for text-to-video"),
                *sparse_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, fused_blocks=True, **settings) -> io.NodeOutput:
        import nodes as comfy_nodes  # ComfyUI's own KSampler implementation
        patched = apply_sparse(model, sparse_settings(**settings), fused=fused_blocks, node_name="Sparse Sampler")
        (out,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                             latent_image, denoise=denoise)
        return io.NodeOutput(out)

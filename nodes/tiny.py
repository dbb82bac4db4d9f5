"""Helper nodes for the embedded tiny models, so they run in a stock ComfyUI graph on any machine:
load one (the tiny HunyuanVideo, or the tiny Wan once trained), encode a prompt with the fixed vocabulary
encoder, decode its latents with the codec both were trained on."""
import torch
from comfy_api.latest import io

from quantsparse_core.models.tiny.codec import LatentCodec
from quantsparse_core.models.tiny.embedded import WAN_WEIGHTS, WEIGHTS
from quantsparse_core.models.tiny.prompts import VOCABULARY, PromptEncoder

CATEGORY = "QuantSparse"
FAMILIES = ("HunyuanVideo", "Wan")


def family_input():
    # optional and last: saved workflows (HunyuanVideo) load unchanged
    return io.Combo.Input("family", options=list(FAMILIES), default=FAMILIES[0], optional=True,
                          tooltip="Which embedded tiny model: HunyuanVideo (shipped) or Wan (trained with "
                                  "`python -m quantsparse_core.models.tiny.train --family wan`)")


def model_space(latent: torch.Tensor, family: str) -> torch.Tensor:
    """A sampled latent (ComfyUI's latent format) as the tiny model and its codec see it: ComfyUI's own
    process_in for the family (HunyuanVideo: a scale; Wan 2.1: per-channel mean and std)."""
    import comfy.latent_formats
    fmt = comfy.latent_formats.Wan21() if family == "Wan" else comfy.latent_formats.HunyuanVideo()
    return fmt.process_in(latent)


class LoadEmbeddedTinyDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseLoadEmbeddedTinyDiT", display_name="Load Embedded Tiny DiT (QuantSparse)",
            category=CATEGORY,
            description="The small HunyuanVideo-architecture model shipped with QuantSparse (8 frames, 128x128), "
                        "or the tiny Wan trained on the same videos.",
            inputs=[family_input()],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, family=FAMILIES[0]) -> io.NodeOutput:
        import comfy.sd

        from .sparse_patch import add_text_mask_batching
        if family == "Wan":
            if not WAN_WEIGHTS.is_file():
                raise ValueError(f"the tiny Wan's weights are not at {WAN_WEIGHTS}: train them with `python -m "
                                 "quantsparse_core.models.tiny.train --family wan --out "
                                 f"{WAN_WEIGHTS}` (on a CUDA GPU: the tiny HunyuanVideo took 8 minutes on an H100), or pick family HunyuanVideo")
            return io.NodeOutput(comfy.sd.load_diffusion_model(str(WAN_WEIGHTS)))
        model = comfy.sd.load_diffusion_model(str(WEIGHTS))
        # Tiny Prompt Encode gives padded [1, 24] text masks (the model was trained on them); ComfyUI's
        # HunyuanVideo takes only one mask per call, so cfg > 1 and batches need this wrapper.
        add_text_mask_batching(model)
        return io.NodeOutput(model)


class TinyPromptEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseTinyPromptEncode", display_name="Tiny Prompt Encode (QuantSparse)",
            category=CATEGORY,
            inputs=[io.String.Input(
                "text", multiline=True, default="a red circle moving right slowly on a black background",
                tooltip="Prompt for the embedded tiny model, in its grammar: 'a COLOR SHAPE moving DIRECTION "
                        "SPEED on a BACKGROUND background'. Words: " + ", ".join(VOCABULARY)),
                    family_input()],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text, family=FAMILIES[0]) -> io.NodeOutput:
        if family == "Wan":  # the same word tokens, zero-padded into Wan's 4096-wide text input
            return io.NodeOutput([[PromptEncoder().encode_wan([text]), {}]])
        ctx, mask, pooled = PromptEncoder().encode([text])  # ValueError names an unknown word
        return io.NodeOutput([[ctx, {"pooled_output": pooled, "attention_mask": mask}]])


class TinyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseTinyDecode", display_name="Tiny Decode (QuantSparse)", category=CATEGORY,
            inputs=[io.Latent.Input("samples", tooltip="Latent from sampling the embedded tiny model "
                                                       "(EmptyHunyuanLatentVideo 256 x 256, length 29: a 32 x 32 x 8 latent, decoded to 8 frames of 128 x 128)"),
                    family_input()],
            outputs=[io.Image.Output(tooltip="The frames of every batch entry, one after another")],
        )

    @classmethod
    def execute(cls, samples, family=FAMILIES[0]) -> io.NodeOutput:
        lat = samples["samples"]
        if lat.ndim != 5 or lat.shape[1] != LatentCodec.CHANNELS:
            raise ValueError(f"expected a 16-channel video latent [B, 16, T, H, W], got {tuple(lat.shape)}")
        video = LatentCodec().decode(model_space(lat.float(), family))   # [B, 3, F, H, W]
        return io.NodeOutput(video.permute(0, 2, 3, 4, 1).reshape(-1, video.shape[3], video.shape[4], 3)
                             .to(torch.float32))

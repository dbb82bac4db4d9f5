"""Helper nodes for the embedded tiny model, so it runs in a stock ComfyUI graph on any machine:
load it, encode a prompt with its fixed vocabulary encoder, decode its latents with its codec."""
import torch
from comfy_api.latest import io

from quantsparse_core.models.tiny.codec import LatentCodec
from quantsparse_core.models.tiny.embedded import WEIGHTS
from quantsparse_core.models.tiny.prompts import VOCABULARY, PromptEncoder

CATEGORY = "QuantSparse"


def hunyuan_latent_scale() -> float:
    """ComfyUI samples HunyuanVideo latents scaled by its latent format; the tiny model's codec
    latents are what the model sees, so decoding multiplies that scale back in."""
    import comfy.latent_formats
    return comfy.latent_formats.HunyuanVideo().scale_factor


class LoadEmbeddedTinyDiT(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseLoadEmbeddedTinyDiT", display_name="Load Embedded Tiny DiT (QuantSparse)",
            category=CATEGORY,
            description="The small HunyuanVideo-architecture model shipped with QuantSparse (8 frames, 128x128).",
            inputs=[],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        import comfy.sd

        from .sparse_patch import add_text_mask_batching
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
                        "SPEED on a BACKGROUND background'. Words: " + ", ".join(VOCABULARY))],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, text) -> io.NodeOutput:
        ctx, mask, pooled = PromptEncoder().encode([text])  # ValueError names an unknown word
        return io.NodeOutput([[ctx, {"pooled_output": pooled, "attention_mask": mask}]])


class TinyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="QuantSparseTinyDecode", display_name="Tiny Decode (QuantSparse)", category=CATEGORY,
            inputs=[io.Latent.Input("samples", tooltip="Latent from sampling the embedded tiny model "
                                                       "(EmptyHunyuanLatentVideo 256 x 256, length 29: a 32 x 32 x 8 latent, decoded to 8 frames of 128 x 128)")],
            outputs=[io.Image.Output(tooltip="The frames of every batch entry, one after another")],
        )

    @classmethod
    def execute(cls, samples) -> io.NodeOutput:
        lat = samples["samples"]
        if lat.ndim != 5 or lat.shape[1] != LatentCodec.CHANNELS:
            raise ValueError(f"expected a HunyuanVideo latent [B, 16, T, H, W], got {tuple(lat.shape)}")
        video = LatentCodec().decode(lat.float() * hunyuan_latent_scale())   # [B, 3, F, H, W]
        return io.NodeOutput(video.permute(0, 2, 3, 4, 1).reshape(-1, video.shape[3], video.shape[4], 3)
                             .to(torch.float32))

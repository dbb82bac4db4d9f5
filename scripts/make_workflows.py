"""Write the example workflows in workflows/ (ComfyUI's UI format), so they are reviewed as code.

    python scripts/make_workflows.py

Each graph is a few lines below; sockets and widget orders follow ComfyUI's /object_info, which
tests/test_comfy_server.py checks every shipped workflow against. Model file names are those of
ComfyUI's own HunyuanVideo and Wan examples (README says where to get them); the Wan graphs keep the
stock shape (ModelSamplingSD3 shift 8, umt5 text encoder, Wan 2.2 A14B as two loaders and two
KSamplerAdvanced split by steps) with our loader and sparse attention in place of the dense ones.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workflows"

DIT = "hunyuan_video_t2v_720p_bf16.safetensors"
CLIP_L = "clip_l.safetensors"
LLAVA = "llava_llama3_fp8_scaled.safetensors"
VAE = "hunyuan_video_vae_bf16.safetensors"
COMPRESSED = "quantsparse/hunyuan_video_quantsparse_w4a8.safetensors"
# Wan: Comfy-Org/Wan_2.1_ComfyUI_repackaged and Wan_2.2_ComfyUI_Repackaged (split_files/...)
WAN21 = "wan2.1_t2v_14B_bf16.safetensors"
WAN22_HIGH, WAN22_LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
WAN21_Q = "wan2.1_t2v_14B_quantsparse_w4a8"
WAN22_HIGH_Q, WAN22_LOW_Q = "wan2.2_t2v_high_noise_14B_quantsparse_w4a8", "wan2.2_t2v_low_noise_14B_quantsparse_w4a8"
WAN_PROMPT = ("a fox running through fresh snow in a pine forest at sunrise, low camera tracking beside it, "
              "snow spraying from its paws, cinematic lighting")
WAN_NEGATIVE = "blurry, low quality, static, distorted, extra limbs, watermark, text, jpeg artifacts"
WAN_SIZE = [832, 480, 81, 1]  # Wan's 480p, 81 frames (5 s at 16 fps)
# HunyuanVideo 1.5: Comfy-Org/HunyuanVideo_1.5_repackaged (split_files/...)
DIT15 = "hunyuanvideo1.5_720p_t2v_fp16.safetensors"
QWEN, BYT5 = "qwen_2.5_vl_7b_fp8_scaled.safetensors", "byt5_small_glyphxl_fp16.safetensors"
VAE15 = "hunyuanvideo15_vae_fp16.safetensors"
DIT15_Q = "hunyuanvideo1.5_720p_t2v_quantsparse_w4a8"
DIT15_I2V_Q = "hunyuanvideo1.5_720p_i2v_quantsparse_w4a8"  # from hunyuanvideo1.5_720p_i2v_fp16.safetensors
SIGCLIP = "sigclip_vision_patch14_384.safetensors"  # the 1.5 image-to-video example's CLIP vision model
PROMPT = ("anime style anime girl with massive fennec ears and one big fluffy tail, she has blonde hair long hair "
          "blue eyes wearing a pink sweater and a long blue skirt walking in a beautiful outdoor scenery with snow "
          "mountains in the background")

# type -> (socket inputs [(name, type)], outputs [(name, type)])
SOCKETS = {
    "UNETLoader": ([], [("MODEL", "MODEL")]),
    "DualCLIPLoader": ([], [("CLIP", "CLIP")]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")]),
    "EmptyHunyuanLatentVideo": ([], [("LATENT", "LATENT")]),
    "VAELoader": ([], [("VAE", "VAE")]),
    "VAEDecodeTiled": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], [("VIDEO", "VIDEO")]),
    "SaveVideo": ([("video", "VIDEO")], []),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "ImageStitch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], []),
    "QuantSparseCalibrate": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("latent", "LATENT"),
                              ("other_expert", "MODEL")], [("MODEL", "MODEL")]),
    "QuantSparseLoadCompressedDiT": ([], [("MODEL", "MODEL")]),
    "QuantSparseSparseSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                  ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "QuantSparseLoadEmbeddedTinyDiT": ([], [("MODEL", "MODEL")]),
    "QuantSparseTinyPromptEncode": ([], [("CONDITIONING", "CONDITIONING")]),
    "QuantSparseTinyDecode": ([("samples", "LATENT")], [("IMAGE", "IMAGE")]),
    "QuantSparseSparseAttention": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "CLIPLoader": ([], [("CLIP", "CLIP")]),
    "ModelSamplingSD3": ([("model", "MODEL")], [("MODEL", "MODEL")]),
    "KSamplerAdvanced": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                          ("latent_image", "LATENT")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "EmptyHunyuanVideo15Latent": ([], [("LATENT", "LATENT")]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "CLIPVisionLoader": ([], [("CLIP_VISION", "CLIP_VISION")]),
    "CLIPVisionEncode": ([("clip_vision", "CLIP_VISION"), ("image", "IMAGE")],
                         [("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")]),
    "HunyuanVideo15ImageToVideo": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                                    ("start_image", "IMAGE"), ("clip_vision_output", "CLIP_VISION_OUTPUT")],
                                   [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")]),
}
WHOLE = ["whole trajectory", 0.875]  # QuantSparse Calibrate's expert_role, expert_boundary for single models
SPARSE = [0.15, 5, 16, -1, 1, "auto", True, "auto", False, "quantsparse"]  # density, refresh, svd rank, warm-up
# steps (-1 = 10%), warm-up blocks, placement, fused blocks, schedule (auto: few-step at <= 8 steps, else standard),
# INT8 dense passes, who runs the dense passes


class Graph:
    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, type_, widgets=(), col=0, row=0, title=None, **inputs):
        sockets, outputs = SOCKETS[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": [60 + 380 * col, round(80 + 260 * row)],
                "size": [340, 200], "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        if title:
            node["title"] = title
        self.nodes.append(node)
        for name, (src, slot) in inputs.items():
            self.connect(src, slot, node, name)
        return node

    def connect(self, src, slot, dst, name):
        link_id = len(self.links) + 1
        inp = next(i for i in dst["inputs"] if i["name"] == name)
        out = src["outputs"][slot]
        inp["link"] = link_id
        out["links"].append(link_id)
        self.links.append([link_id, src["id"], slot, dst["id"], dst["inputs"].index(inp), out["type"]])

    def to_json(self):
        for n in self.nodes:  # optional sockets left unconnected are dropped, as the editor does
            n["inputs"] = [i for i in n["inputs"]
                           if i["link"] is not None or i["name"] not in ("audio", "image2", "other_expert")]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def text_encoders(g, row=1):
    clip = g.add("DualCLIPLoader", [CLIP_L, LLAVA, "hunyuan_video", "default"], 0, row)
    text = g.add("CLIPTextEncode", [PROMPT], 1, row, clip=(clip, 0))
    pos = g.add("FluxGuidance", [6.0], 2, row, conditioning=(text, 0))
    return pos


def calibrate_and_save():
    g = Graph()
    model = g.add("UNETLoader", [DIT, "default"], 0, 0)
    pos = text_encoders(g)
    latent = g.add("EmptyHunyuanLatentVideo", [848, 480, 73, 1], 0, 2, title="Calibration size")
    g.add("QuantSparseCalibrate", ["4", "8", "msad", 20, 20, 15, 0.1, 0.1, 128, 256, 0, "fixed",
                                   "hunyuan_video_quantsparse_w4a8", *WHOLE], 3, 1,
          model=(model, 0), positive=(pos, 0), latent=(latent, 0))
    return g


def decode_and_save(g, samples, col, row, prefix):
    vae = g.add("VAELoader", [VAE], col, row + 1)
    images = g.add("VAEDecodeTiled", [256, 64, 64, 8], col + 1, row, samples=(samples, 0), vae=(vae, 0))
    video = g.add("CreateVideo", [24.0, 8], col + 2, row, images=(images, 0))
    g.add("SaveVideo", [prefix, "auto", "auto"], col + 3, row, video=(video, 0))
    return images


def text_to_video_compressed_sparse():
    g = Graph()
    model = g.add("QuantSparseLoadCompressedDiT", [COMPRESSED], 0, 0)
    pos = text_encoders(g)
    neg = g.add("ConditioningZeroOut", [], 3, 2, conditioning=(pos, 0))
    latent = g.add("EmptyHunyuanLatentVideo", [848, 480, 73, 1], 0, 2)
    samples = g.add("QuantSparseSparseSampler", [0, "fixed", 30, 1.0, "euler", "simple", 1.0, *SPARSE], 4, 0,
                    model=(model, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    decode_and_save(g, samples, 5, 0, "video/quantsparse")
    return g


def dense_vs_quantsparse():
    g = Graph()
    dense = g.add("UNETLoader", [DIT, "default"], 0, 0, title="Dense bf16")
    compressed = g.add("QuantSparseLoadCompressedDiT", [COMPRESSED], 0, 3)
    pos = text_encoders(g, row=1)
    neg = g.add("ConditioningZeroOut", [], 3, 2, conditioning=(pos, 0))
    latent = g.add("EmptyHunyuanLatentVideo", [848, 480, 73, 1], 0, 2)
    a = g.add("KSampler", [0, "fixed", 30, 1.0, "euler", "simple", 1.0], 4, 0, title="Dense",
              model=(dense, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    b = g.add("QuantSparseSparseSampler", [0, "fixed", 30, 1.0, "euler", "simple", 1.0, *SPARSE], 4, 3,
              title="QuantSparse W4A8 + 15%", model=(compressed, 0), positive=(pos, 0), negative=(neg, 0),
              latent_image=(latent, 0))
    ia = decode_and_save(g, a, 5, 0, "video/dense")
    ib = decode_and_save(g, b, 5, 3, "video/quantsparse")
    both = g.add("ImageStitch", ["right", True, 8, "black"], 8, 2, image1=(ia, 0), image2=(ib, 0))
    video = g.add("CreateVideo", [24.0, 8], 9, 2, images=(both, 0))
    g.add("SaveVideo", ["video/dense_vs_quantsparse", "auto", "auto"], 10, 2, video=(video, 0))
    return g


def tiny_model_demo():
    """Runs anywhere (CPU, no downloads): the embedded tiny model, calibrated, dense vs QuantSparse."""
    g = Graph()
    model = g.add("QuantSparseLoadEmbeddedTinyDiT", ["HunyuanVideo"], 0, 0)
    cond = g.add("QuantSparseTinyPromptEncode", ["a red circle moving right slowly on a black background", "HunyuanVideo"],
                  0, 1)
    calib = g.add("EmptyHunyuanLatentVideo", [256, 256, 29, 1], 0, 2, title="Calibration size")
    latent = g.add("EmptyHunyuanLatentVideo", [256, 256, 29, 1], 0, 3, title="Video size (8 frames, 128x128)")
    compressed = g.add("QuantSparseCalibrate", ["4", "8", "msad", 8, 20, 5, 0.1, 0.1, 128, 256, 0, "fixed",
                                                "tiny_quantsparse_w4a8", *WHOLE], 1, 0,
                       model=(model, 0), positive=(cond, 0), latent=(calib, 0))
    dense = g.add("KSampler", [0, "fixed", 20, 1.0, "euler", "simple", 1.0], 2, 0, title="Dense",
                  model=(model, 0), positive=(cond, 0), negative=(cond, 0), latent_image=(latent, 0))
    sparse = g.add("QuantSparseSparseSampler", [0, "fixed", 20, 1.0, "euler", "simple", 1.0, 0.25, 5, 16, -1, 1,
                                                "auto", True, "auto", False, "quantsparse"], 2, 2,
                   title="QuantSparse W4A8 + 25%",
                   model=(compressed, 0), positive=(cond, 0), negative=(cond, 0), latent_image=(latent, 0))
    da = g.add("QuantSparseTinyDecode", ["HunyuanVideo"], 3, 0, samples=(dense, 0))
    db = g.add("QuantSparseTinyDecode", ["HunyuanVideo"], 3, 2, samples=(sparse, 0))
    both = g.add("ImageStitch", ["right", True, 4, "black"], 4, 1, image1=(da, 0), image2=(db, 0))
    g.add("SaveAnimatedWEBP", ["quantsparse/tiny_dense_vs_quantsparse", 8.0, True, 80, "default"], 5, 1,
          images=(both, 0))
    return g


def wan_text(g, row=1):
    """umt5 through CLIPLoader (type wan), a positive and a negative prompt: Wan runs cfg > 1."""
    clip = g.add("CLIPLoader", [UMT5, "wan", "default"], 0, row)
    pos = g.add("CLIPTextEncode", [WAN_PROMPT], 1, row, title="Positive", clip=(clip, 0))
    neg = g.add("CLIPTextEncode", [WAN_NEGATIVE], 1, row + 1, title="Negative", clip=(clip, 0))
    return pos, neg


def wan_decode(g, samples, col, row, prefix):
    vae = g.add("VAELoader", [WAN_VAE], col, row + 1)
    images = g.add("VAEDecode", [], col + 1, row, samples=(samples, 0), vae=(vae, 0))
    video = g.add("CreateVideo", [16.0, 8], col + 2, row, images=(images, 0))
    g.add("SaveVideo", [prefix, "auto", "auto"], col + 3, row, video=(video, 0))


def wan21_text_to_video():
    """Wan 2.1 T2V 14B, compressed, with the sparse sampler (SSAR at 15%)."""
    g = Graph()
    model = g.add("QuantSparseLoadCompressedDiT", [f"quantsparse/{WAN21_Q}.safetensors"], 0, 0)
    shifted = g.add("ModelSamplingSD3", [8.0], 1, 0, model=(model, 0))
    pos, neg = wan_text(g)
    latent = g.add("EmptyHunyuanLatentVideo", WAN_SIZE, 0, 3)
    samples = g.add("QuantSparseSparseSampler", [0, "fixed", 30, 6.0, "uni_pc", "simple", 1.0, *SPARSE], 3, 0,
                    model=(shifted, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    wan_decode(g, samples, 4, 0, "video/wan21_quantsparse")
    return g


def wan22_text_to_video():
    """Wan 2.2 A14B T2V: both experts compressed, each sampled with sparse attention over its own steps
    (high noise 0-10, low noise 10-20), the stock two-sampler graph."""
    g = Graph()
    pos, neg = wan_text(g, row=3)
    latent = g.add("EmptyHunyuanLatentVideo", WAN_SIZE, 0, 5)
    samplers = []
    for i, (name, start, end, noise, leftover) in enumerate(((WAN22_HIGH_Q, 0, 10, "enable", "enable"),
                                                             (WAN22_LOW_Q, 10, 10000, "disable", "disable"))):
        row = 1.5 * i  # a Sparse Attention node is taller than one grid row
        model = g.add("QuantSparseLoadCompressedDiT", [f"quantsparse/{name}.safetensors"], 0, row)
        shifted = g.add("ModelSamplingSD3", [8.0], 1, row, model=(model, 0))
        sparse = g.add("QuantSparseSparseAttention", SPARSE, 2, row, model=(shifted, 0))
        src = latent if not samplers else samplers[-1]
        samplers.append(g.add("KSamplerAdvanced", [noise, 0, "fixed", 20, 3.5, "euler", "simple", start, end, leftover],
                              3 + i, row, title=("High" if i == 0 else "Low") + " noise expert",
                              model=(sparse, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(src, 0)))
    wan_decode(g, samplers[-1], 5, 1.5, "video/wan22_quantsparse")
    return g


def wan_calibrate_and_save():
    """Wan 2.1 T2V 14B and both Wan 2.2 A14B T2V experts calibrated with MSAD, streamed block by block
    (calibration latent 832 x 480 x 49: about 18 GB of GPU memory by the node's estimate). Each 2.2 expert
    takes its samples from the steps it serves, on trajectories where the other expert runs the rest (its
    MODEL on other_expert); delete the rows you do not need."""
    g = Graph()
    pos, _ = wan_text(g, row=3)
    latent = g.add("EmptyHunyuanLatentVideo", [832, 480, 49, 1], 0, 5, title="Calibration size")
    wan21 = g.add("UNETLoader", [WAN21, "default"], 0, 0)
    g.add("QuantSparseCalibrate", ["4", "8", "msad", 20, 20, 15, 0.1, 0.1, 128, 256, 0, "fixed", WAN21_Q, *WHOLE],
          3, 0, model=(wan21, 0), positive=(pos, 0), latent=(latent, 0))
    high = g.add("UNETLoader", [WAN22_HIGH, "default"], 0, 1, title="Wan 2.2 high-noise expert")
    low = g.add("UNETLoader", [WAN22_LOW, "default"], 0, 2, title="Wan 2.2 low-noise expert")
    for row, (model, other, out, role) in enumerate(((high, low, WAN22_HIGH_Q, "high noise"),
                                                     (low, high, WAN22_LOW_Q, "low noise")), start=1):
        g.add("QuantSparseCalibrate", ["4", "8", "msad", 20, 20, 15, 0.1, 0.1, 128, 256, 0, "fixed", out, role, 0.875],
              3 + row, 0, model=(model, 0), positive=(pos, 0), latent=(latent, 0), other_expert=(other, 0))  # side by side: tall
    return g


def hunyuan15_text(g, row=1):
    """Qwen 2.5 VL + glyph byT5 through DualCLIPLoader (type hunyuan_video_15); 1.5 runs real cfg."""
    clip = g.add("DualCLIPLoader", [QWEN, BYT5, "hunyuan_video_15", "default"], 0, row)
    pos = g.add("CLIPTextEncode", [PROMPT], 1, row, title="Positive", clip=(clip, 0))
    neg = g.add("CLIPTextEncode", [WAN_NEGATIVE], 1, row + 1, title="Negative", clip=(clip, 0))
    return pos, neg


def hunyuan15_text_to_video():
    """HunyuanVideo 1.5 T2V (720p model), compressed, with the sparse sampler; 1.5 runs ComfyUI's blocks."""
    g = Graph()
    model = g.add("QuantSparseLoadCompressedDiT", [f"quantsparse/{DIT15_Q}.safetensors"], 0, 0)
    pos, neg = hunyuan15_text(g)
    latent = g.add("EmptyHunyuanVideo15Latent", [1280, 720, 121, 1], 0, 3)
    samples = g.add("QuantSparseSparseSampler", [0, "fixed", 30, 6.0, "euler", "simple", 1.0, *SPARSE], 3, 0,
                    model=(model, 0), positive=(pos, 0), negative=(neg, 0), latent_image=(latent, 0))
    vae = g.add("VAELoader", [VAE15], 4, 1)
    images = g.add("VAEDecodeTiled", [256, 64, 64, 8], 5, 0, samples=(samples, 0), vae=(vae, 0))
    video = g.add("CreateVideo", [24.0, 8], 6, 0, images=(images, 0))
    g.add("SaveVideo", ["video/hunyuan15_quantsparse", "auto", "auto"], 7, 0, video=(video, 0))
    return g


def hunyuan15_image_to_video():
    """HunyuanVideo 1.5 I2V (720p model): the start image through SigLIP (CLIPVisionEncode) and
    HunyuanVideo15ImageToVideo (image latent + mask channels, image tokens), compressed model, sparse sampler."""
    g = Graph()
    model = g.add("QuantSparseLoadCompressedDiT", [f"quantsparse/{DIT15_I2V_Q}.safetensors"], 0, 0)
    pos, neg = hunyuan15_text(g)
    vae = g.add("VAELoader", [VAE15], 0, 3)
    image = g.add("LoadImage", ["example.png", "image"], 0, 4, title="Start image")
    vision = g.add("CLIPVisionLoader", [SIGCLIP], 1, 4)
    encoded = g.add("CLIPVisionEncode", ["center"], 2, 4, clip_vision=(vision, 0), image=(image, 0))
    i2v = g.add("HunyuanVideo15ImageToVideo", [1280, 720, 121, 1], 3, 2, positive=(pos, 0), negative=(neg, 0),
                vae=(vae, 0), start_image=(image, 0), clip_vision_output=(encoded, 0))
    samples = g.add("QuantSparseSparseSampler", [0, "fixed", 30, 6.0, "euler", "simple", 1.0, *SPARSE], 4, 0,
                    model=(model, 0), positive=(i2v, 0), negative=(i2v, 1), latent_image=(i2v, 2))
    images = g.add("VAEDecodeTiled", [256, 64, 64, 8], 5, 0, samples=(samples, 0), vae=(vae, 0))
    video = g.add("CreateVideo", [24.0, 8], 6, 0, images=(images, 0))
    g.add("SaveVideo", ["video/hunyuan15_i2v_quantsparse", "auto", "auto"], 7, 0, video=(video, 0))
    return g


def hunyuan15_calibrate_and_save():
    """HunyuanVideo 1.5 T2V calibrated with MSAD (its byT5 tokens and zero image channels from ComfyUI's own
    conds), at a smaller calibration size than it generates (848 x 480 x 61)."""
    g = Graph()
    model = g.add("UNETLoader", [DIT15, "default"], 0, 0)
    pos, _ = hunyuan15_text(g)
    latent = g.add("EmptyHunyuanVideo15Latent", [848, 480, 61, 1], 0, 3, title="Calibration size")
    g.add("QuantSparseCalibrate", ["4", "8", "msad", 20, 20, 15, 0.1, 0.1, 128, 256, 0, "fixed", DIT15_Q, *WHOLE],
          3, 0, model=(model, 0), positive=(pos, 0), latent=(latent, 0))
    return g


WORKFLOWS = {
    "quantsparse_hunyuan15_t2v.json": hunyuan15_text_to_video,
    "quantsparse_hunyuan15_i2v.json": hunyuan15_image_to_video,
    "quantsparse_hunyuan15_calibrate_and_save.json": hunyuan15_calibrate_and_save,
    "quantsparse_wan21_t2v.json": wan21_text_to_video,
    "quantsparse_wan22_a14b_t2v.json": wan22_text_to_video,
    "quantsparse_wan_calibrate_and_save.json": wan_calibrate_and_save,
    "quantsparse_calibrate_and_save.json": calibrate_and_save,
    "quantsparse_text_to_video.json": text_to_video_compressed_sparse,
    "quantsparse_dense_vs_quantsparse.json": dense_vs_quantsparse,
    "quantsparse_tiny_model_demo.json": tiny_model_demo,
}


def main():
    OUT.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        tmp = OUT / (name + ".tmp")
        tmp.write_text(json.dumps(build().to_json(), indent=1) + "\n")
        tmp.replace(OUT / name)
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()

"""The HunyuanVideo family inside ComfyUI: each variant is told apart, the nodes refuse what they do not
support, and reference-latent tokens are video tokens in the sparse patch (issue 17).

Runs only with COMFYUI_PATH set. Every model is ComfyUI's own HunyuanVideo class at small widths with random
weights, loaded through ComfyUI's loader (comfy.sd.load_diffusion_model_state_dict), so ComfyUI's detection
names the variant too (its model class is asserted beside ours).
"""
import dataclasses
import importlib

import pytest
import torch

from comfy_env import record_sparse_calls
from test_comfy_nodes import load_pack
from test_comfy_pipeline import pack  # noqa: F401  (fixture: the pack with a temporary models folder)

PACK = "comfyui_quantsparse_under_test"
TXT = 7  # text tokens of every test prompt

BASE = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=32, hidden_size=256, mlp_ratio=4.0,
            num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
            qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
            vision_in_dim=None, meanflow_sum=False)
_V15 = dict(in_channels=65, out_channels=32, vec_in_dim=None, patch_size=[1, 1, 1], guidance_embed=False, byt5=True,
            depth_single_blocks=0, use_cond_type_embedding=True, vision_in_dim=1152, meanflow_sum=True)
# variant name -> (config changes from BASE, the model class ComfyUI's detection picks)
UNSUPPORTED = {
    "SkyReels I2V": (dict(in_channels=32), "HunyuanVideoSkyreelsI2V"),
    # HunyuanVideo 1.5 T2V/I2V: supported by every node since issue 17 (tests/test_comfy_v15_sparse.py)
    "HunyuanVideo 1.5 super-resolution": ({**_V15, "in_channels": 98}, "HunyuanVideo15_SR_Distilled"),
    "HunyuanImage 2.1": (dict(in_channels=64, out_channels=64, vec_in_dim=None, patch_size=[1, 1], axes_dim=[64, 64],
                              byt5=True, guidance_embed=False), "HunyuanImage21"),
    "HunyuanImage 2.1 refiner": (dict(in_channels=128, out_channels=64, vec_in_dim=None, patch_size=[1, 1, 1],
                                      guidance_embed=False), "HunyuanImage21Refiner"),
}
I2V = (dict(in_channels=33), "HunyuanVideoI2V")
SPARSE = dict(density=0.3, refresh_interval=2, svd_rank=4, warmup_steps=0, warmup_blocks=0, cache_placement="auto")


def _module(name):
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.{name}")


def comfy_model(rng, **changes):
    """A ModelPatcher of ComfyUI's HunyuanVideo class with BASE + changes, random weights, via ComfyUI's loader."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    dm = HunyuanVideo(operations=comfy.ops.disable_weight_init, **{**BASE, **changes})
    sd = {k: torch.randn(v.shape, generator=rng) * 0.05 for k, v in dm.state_dict().items()}
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    assert patcher is not None, f"ComfyUI did not detect {changes}"
    return patcher


def _cond(rng, **extra):
    ctx = torch.randn(1, TXT, 32, generator=rng)
    mask = torch.ones(1, TXT, dtype=torch.long)
    mask[0, 5:] = 0  # padded like a real prompt
    return [[ctx, {"pooled_output": torch.randn(1, 768, generator=rng), "attention_mask": mask,
                   "guidance": 6.0, **extra}]]


# ---- telling the family apart, refusing what is not supported -----------------------------------------------------
def assert_refused(calls: dict, variant: str, comfy_class: str, *supported: str) -> None:
    """Each {node name: call} raises ValueError naming the node, the variant and ComfyUI's class, then what the
    node supports (each string of `supported` in the message)."""
    for node, call in calls.items():
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"{node} does not support this MODEL: it is {variant} (ComfyUI model class "
                              f"{comfy_class})"), msg
        assert all(s in msg for s in supported), msg


@pytest.mark.parametrize("variant", list(UNSUPPORTED))
def test_every_node_refuses_an_unsupported_variant_naming_it(pack, rng, variant):
    nodes, _ = pack
    family, fused = _module("model_family"), _module("fused_blocks")
    changes, comfy_class = UNSUPPORTED[variant]
    model = comfy_model(rng, **changes)
    assert type(model.model).__name__ == comfy_class
    assert family.classify(model) == variant
    cond = _cond(rng)
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    calls = {
        "QuantSparse Calibrate": lambda: nodes["QuantSparseCalibrate"].execute(
            model=model, positive=cond, latent=latent, weight_bits="4", activation_bits="8", method="rtn", samples=1,
            steps=2, epochs=1, lambda_global=1.0, lambda_local=1.0, pool_stride=16, salient_tokens=16, seed=0,
            output_name="refused"),
        "QuantSparse Sparse Attention": lambda: nodes["QuantSparseSparseAttention"].execute(model=model, **SPARSE),
        "Sparse Sampler": lambda: nodes["QuantSparseSparseSampler"].execute(
            model=model, seed=0, steps=2, cfg=1.0, sampler_name="euler", scheduler="simple", positive=cond,
            negative=cond, latent_image=latent, denoise=1.0, **SPARSE),
        "QuantSparse fused blocks": lambda: fused.apply_fused_blocks(model),
    }
    assert_refused(calls, variant, comfy_class, "supports HunyuanVideo 1.0 T2V")
    assert not (pack[1] / "quantsparse" / "refused.safetensors").exists()  # the refused Calibrate wrote nothing


def test_t2v_and_i2v_are_told_apart_and_i2v_is_sparse_only(pack, rng):
    nodes, _ = pack
    family = _module("model_family")
    (tiny,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    assert family.classify(tiny) == "HunyuanVideo 1.0 T2V"
    i2v = comfy_model(rng, **I2V[0])
    assert type(i2v.model).__name__ == I2V[1] and family.classify(i2v) == "HunyuanVideo 1.0 I2V"
    with pytest.raises(ValueError, match=r"QuantSparse Calibrate: this HunyuanVideo 1\.0 I2V MODEL needs its start "
                                         r"image: feed the prompt through HunyuanImageToVideo"):  # MSAD with one: test_comfy_variant_checkpoints
        nodes["QuantSparseCalibrate"].execute(
            model=i2v, positive=_cond(rng), latent={"samples": torch.zeros(1, 16, 2, 8, 8)}, weight_bits="4",
            activation_bits="8", method="msad", samples=1, steps=2, epochs=1, lambda_global=1.0, lambda_local=1.0,
            pool_stride=16, salient_tokens=16, seed=0, output_name="refused")
    (patched,) = nodes["QuantSparseSparseAttention"].execute(model=i2v, **SPARSE).result
    assert patched is not i2v and "quantsparse_sparse" in patched.model_options["transformer_options"]


def test_load_compressed_dit_refuses_a_checkpoint_of_another_variant(pack, rng, monkeypatch):
    """ComfyUI builds whatever a file's keys describe: a SkyReels I2V file loads as HunyuanVideoSkyreelsI2V and is
    refused. (The format itself holds 1.0 T2V / I2V and 1.5 only, so the file is written and read with that check
    lifted: this is the node's own guard; tests/test_comfy_variant_checkpoints.py loads I2V and 1.5 files.)"""
    from quantsparse_core.io import checkpoint
    from quantsparse_core.io.checkpoint import save_compressed
    from quantsparse_core.models import HunyuanVideoDiT, get_preset
    from quantsparse_core.quant.policy import default_policy, quantize_model
    nodes, models = pack
    monkeypatch.setattr(checkpoint, "LOADABLE", checkpoint.LOADABLE + ("SkyReels I2V",))
    m = HunyuanVideoDiT(dataclasses.replace(get_preset("test"), in_channels=32))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    policy = default_policy(m, 4, 8)
    quantize_model(m, policy)
    (models / "quantsparse").mkdir(exist_ok=True)
    save_compressed(m, models / "quantsparse" / "skyreels.safetensors", policy)
    with pytest.raises(ValueError, match=r"^Load Compressed DiT does not support this MODEL: it is SkyReels I2V "
                                         r"\(ComfyUI model class HunyuanVideoSkyreelsI2V\)\. Load Compressed DiT supports "
                                         r"HunyuanVideo 1\.0 T2V, HunyuanVideo 1\.0 I2V, HunyuanVideo 1\.5 T2V/I2V"):
        nodes["QuantSparseLoadCompressedDiT"].execute("quantsparse/skyreels.safetensors")


# ---- reference-latent tokens are video tokens in the sparse patch -----------------------------------------------
def _recorder(monkeypatch):
    """(txt_len, grid, sequence length, the block mask after the call) of every sparse attention call."""
    def record(attn, q, mask, c):
        bm = attn.block_mask(c.block_type, c.block_index, q.shape[0])
        return c.txt_len, tuple(c.grid), q.shape[2], None if bm is None else bm.keep.clone()
    return record_sparse_calls(monkeypatch, _module("sparse_patch"), record)


def _sample(model, cond, latent, steps=3, seed=5):
    import nodes as comfy_nodes  # ComfyUI's own KSampler
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", cond, cond, latent)
    return out["samples"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fused", [True, False], ids=["fused-blocks", "comfy-blocks"])
def test_reference_latent_tokens_are_video_tokens(pack, rng, monkeypatch, fused):
    """HunyuanImageToVideo's "custom" guidance gives the model a ref_latent that ComfyUI puts between the text and
    the video ([text, reference frames, video frames]). Dense (density 1) through the patch equals ComfyUI; the
    masks' text rows and columns are exactly the text tokens' blocks (was: the 128 reference tokens counted as
    text, so a whole second block of rows and columns was kept as text)."""
    from quantsparse_core.sparse.masks import text_blocks
    nodes, _ = pack
    model = comfy_model(rng)
    ref = torch.randn(1, 16, 2, 16, 16, generator=rng)          # 2 frames of 8 x 8 tokens = 128 tokens
    cond = _cond(rng, ref_latent=ref)
    latent = {"samples": torch.zeros(1, 16, 4, 16, 16)}         # 4 frames: 256 video tokens
    seen = _recorder(monkeypatch)
    patch = nodes["QuantSparseSparseAttention"]
    (dense_patch,) = patch.execute(model=model, fused_blocks=fused, **{**SPARSE, "density": 1.0}).result
    rel = _rel(_sample(dense_patch, cond, latent), _sample(model, cond, latent))
    print(f"ref_latent, density 1 through the patch vs ComfyUI: relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    assert seen and {s[:3] for s in seen} == {(TXT, (2 + 4, 8, 8), TXT + 128 + 256)}

    seen.clear()
    (sparse,) = patch.execute(model=model, fused_blocks=fused, **SPARSE).result
    assert torch.isfinite(_sample(sparse, cond, latent)).all()
    masks = [s[3] for s in seen if s[3] is not None]
    assert masks and {s[:3] for s in seen} == {(TXT, (6, 8, 8), TXT + 384)}
    nt = text_blocks(TXT, 128)
    for keep in masks:                 # [heads, 4, 4] blocks of 128: block 0 holds the text
        assert nt == 1 and keep[:, :nt, :].all() and keep[:, :, :nt].all()
        assert not keep[:, nt, :].all(), "the reference tokens' block is kept like text"


def test_reference_latent_of_another_size_is_refused(pack, rng):
    nodes, _ = pack
    model = comfy_model(rng)
    cond = _cond(rng, ref_latent=torch.randn(1, 16, 1, 16, 8, generator=rng))
    (sparse,) = nodes["QuantSparseSparseAttention"].execute(model=model, **SPARSE).result
    with pytest.raises(ValueError, match=r"reference latent .* 8 x 4 token grid and the latent .* 8 x 8"):
        _sample(sparse, cond, {"samples": torch.zeros(1, 16, 2, 16, 16)})


@pytest.mark.parametrize("mode", ["v1 (concat)", "v2 (replace)"])
def test_i2v_through_the_sparse_patch_equals_comfyui(pack, rng, monkeypatch, mode):
    """HunyuanVideo 1.0 I2V as HunyuanImageToVideo conditions it: the image latent concatenated as channels (v1),
    or the first frame replaced with per-token modulation (v2). The token layout stays [text, video]."""
    nodes, _ = pack
    model = comfy_model(rng, **I2V[0])
    image = torch.randn(1, 16, 1, 16, 16, generator=rng)
    mask = torch.ones(1, 1, 3, 16, 16)
    mask[:, :, :1] = 0.0
    if mode == "v1 (concat)":
        cond, latent = _cond(rng, concat_latent_image=image, concat_mask=mask), {"samples": torch.zeros(1, 16, 3, 16, 16)}
    else:
        start = torch.zeros(1, 16, 3, 16, 16)
        start[:, :, :1] = image
        cond, latent = _cond(rng, guiding_frame_index=0), {"samples": start, "noise_mask": mask}
    seen = _recorder(monkeypatch)
    (dense_patch,) = nodes["QuantSparseSparseAttention"].execute(model=model, **{**SPARSE, "density": 1.0}).result
    rel = _rel(_sample(dense_patch, cond, latent), _sample(model, cond, latent))
    print(f"I2V {mode}, density 1 through the patch vs ComfyUI: relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    assert seen and {s[:3] for s in seen} == {(TXT, (3, 8, 8), TXT + 192)}

"""Compressed checkpoints of HunyuanVideo 1.0 I2V and 1.5 (issue 17), without ComfyUI
(tests/test_comfy_variant_checkpoints.py loads the same files in ComfyUI).

RTN compression (default policy, round to nearest, no calibration) of random-weight `test-i2v` and
`test-1.5` models -> save -> load: the loaded model equals the in-memory compressed model exactly and stays
within the RTN error of the float model; the header carries the 1.5 config fields (and a 1.0 file's header
does not); the loader checks them and refuses the variants the format does not hold, naming them.
"""
import dataclasses

import pytest
import torch

from quantsparse_core.io import CheckpointError, load_compressed, save_compressed
from quantsparse_core.io import checkpoint as ckpt
from quantsparse_core.models import HunyuanVideoDiT, get_preset
from quantsparse_core.models.config import V15_FIELDS
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import LayerRule, default_policy, quantize_model, storage_bytes

from test_checkpoint import _rewrite

V15_MEANFLOW = dataclasses.replace(get_preset("test-1.5"), meanflow=True)  # the distilled 1.5 models' time_r_in
CONFIGS = {"test-i2v": get_preset("test-i2v"), "test-1.5": get_preset("test-1.5"), "test-1.5-meanflow": V15_MEANFLOW}
EXTRA_INPUTS = ("byt5_in.", "vision_in.", "time_r_in.", "cond_type_embedding")

# RTN relative error of the whole model against its float self on these random weights and inputs, 12 seeds
# each (mean +- std): i2v W8A8 0.0120 +- 0.0006, W4A8 0.147 +- 0.006; 1.5 W8A8 0.0060 +- 0.0003, W4A8
# 0.073 +- 0.004; 1.5 meanflow W8A8 0.0082 +- 0.0005. The bounds sit 8 sigma or more above the mean.
RTN_BOUND = {("test-i2v", 8): 0.02, ("test-i2v", 4): 0.25, ("test-1.5", 8): 0.01, ("test-1.5", 4): 0.12,
             ("test-1.5-meanflow", 8): 0.013}


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def random_model(config, rng):
    """Random weights that bf16 represents exactly (real sources are bf16; the file stores floats in bf16)."""
    m = HunyuanVideoDiT(config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=rng) * 0.05).bfloat16().float())
    return m.eval()


def rtn(model, w_bits, a_bits):
    """RTN compression: the default policy's linears quantized with unit clips, no smoothing or rotation, frozen."""
    q = HunyuanVideoDiT(model.config)
    q.load_state_dict(model.state_dict())
    policy = default_policy(q, w_bits, a_bits)
    quantize_model(q, policy)
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.freeze()
    return q.eval(), policy


def inputs(config, rng, b=2):
    """Every input the variant takes: I2V with a reference latent and a text mask; 1.5 with byT5 and image tokens."""
    p = config.patch_size[1]
    kw = dict(x=torch.randn(b, config.in_channels, 2, 4 * p, 3 * p, generator=rng),
              timestep=torch.rand(b, generator=rng) * 1000, context=torch.randn(b, 6, config.context_in_dim, generator=rng))
    mask = torch.ones(b, 6, dtype=torch.long)
    mask[:, 4:] = 0
    kw["attention_mask"] = mask
    if config.vec_in_dim:
        kw["y"] = torch.randn(b, config.vec_in_dim, generator=rng)
    if config.byt5_in_dim:
        kw["txt_byt5"] = torch.randn(b, 3, config.byt5_in_dim, generator=rng)
        kw["clip_fea"] = torch.randn(b, 4, config.vision_in_dim, generator=rng)
    else:
        kw["ref_latent"] = torch.randn(b, config.in_channels, 1, 4 * p, 3 * p, generator=rng)
    if config.meanflow:
        kw["timestep_r"] = torch.rand(b, generator=rng)
    return kw


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ---- the layer policy ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test-1.5", "hunyuan-video-1.5-8b", "hunyuan-video-i2v-13b"])
def test_default_policy_quantizes_block_linears_and_keeps_input_side_linears_bf16(name):
    config = dataclasses.replace(get_preset(name), meanflow=True)  # time_r_in too
    m = HunyuanVideoDiT(config, device="meta")
    pol = default_policy(m, 4, 8)
    # per double block: 2 x (mod, qkv, proj, mlp.0, mlp.2); per single block: linear1, linear2, modulation
    assert len(pol) == 10 * config.depth_double + 3 * config.depth_single
    assert sorted({k.split(".")[0] for k in pol}) == sorted({"double_blocks"} | ({"single_blocks"} if config.depth_single
                                                                                   else set()))
    assert pol[f"double_blocks.{config.depth_double - 1}.txt_mod.lin"] == LayerRule(4, 16)
    assert pol[f"double_blocks.{config.depth_double - 1}.img_mlp.2"] == LayerRule(4, 8)
    linears = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    extra = {n for n in linears if n.startswith(EXTRA_INPUTS)}
    if config.byt5_in_dim:
        assert extra >= {"byt5_in.fc1", "byt5_in.fc3", "vision_in.proj.1", "vision_in.proj.3", "time_r_in.in_layer"}
    assert not extra & set(pol)
    # The storage figure counted independently: int4 weights two per byte + an fp32 scale per output channel,
    # every other parameter (the 1.5 inputs included) in bf16.
    mods = dict(m.named_modules())
    n_params = sum(p.numel() for p in m.parameters())
    quant = sum(mods[n].weight.numel() // 2 + mods[n].weight.shape[0] * 4 for n in pol)
    assert storage_bytes(m, pol)["total"] == quant + 2 * (n_params - sum(mods[n].weight.numel() for n in pol))
    if name == "hunyuan-video-1.5-8b":
        kept = sum(p.numel() for n, p in m.named_parameters() if n.startswith(EXTRA_INPUTS))
        assert 15e6 < kept < 21e6 and 8.2e9 < n_params < 8.4e9  # the 1.5 inputs: ~0.2% of the weights


# ---- round trip -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,w_bits,a_bits", [("test-i2v", 4, 8), ("test-i2v", 8, 8), ("test-1.5", 4, 8),
                                                ("test-1.5", 8, 8), ("test-1.5-meanflow", 8, 8)])
def test_rtn_round_trip_equals_in_memory_model_and_stays_near_float(rng, tmp_path, name, w_bits, a_bits):
    config = CONFIGS[name]
    dense = random_model(config, rng)
    q, policy = rtn(dense, w_bits, a_bits)
    path = tmp_path / f"{name}.safetensors"
    save_compressed(q, path, policy, calibration={"method": "rtn"})
    loaded, header = load_compressed(path)
    assert loaded.config == config and header["calibration"] == {"method": "rtn"}
    assert {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)} == set(policy)
    kw = inputs(config, rng)
    with torch.no_grad():
        a, b, ref = loaded(**kw), q(**kw), dense(**kw)
    # Tolerance 0: the file holds the frozen layers' codes and scales and the float tensors are bf16-exact.
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    rel = _rel(a, ref)
    print(f"{name} W{w_bits}A{a_bits} RTN vs float: relative error {rel:.4f}")
    assert 0 < rel < RTN_BOUND[(name, w_bits)], rel


# ---- the header's config --------------------------------------------------------------------------------------------
def _saved(config, rng, tmp_path, file="m.safetensors"):
    q, policy = rtn(random_model(config, rng), 4, 8)
    save_compressed(q, tmp_path / file, policy)
    return tmp_path / file


def test_header_carries_the_15_fields_and_leaves_10_headers_as_they_were(rng, tmp_path):
    from safetensors import safe_open
    import json

    def config_of(path):
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()[ckpt.HEADER_KEY])["config"]

    t2v = config_of(_saved(get_preset("test"), rng, tmp_path, "t2v.safetensors"))
    assert set(t2v) == {"hidden_size", "num_heads", "depth_double", "depth_single", "mlp_ratio", "in_channels",
                        "out_channels", "patch_size", "context_in_dim", "vec_in_dim", "guidance_embed", "rope_axes",
                        "rope_theta", "refiner_blocks"}  # what format version 1 always wrote
    i2v = config_of(_saved(get_preset("test-i2v"), rng, tmp_path, "i2v.safetensors"))
    assert set(i2v) == set(t2v) and i2v["in_channels"] == 33 and i2v["guidance_embed"] is False
    v15 = config_of(_saved(V15_MEANFLOW, rng, tmp_path, "v15.safetensors"))
    assert {k: v15[k] for k in V15_FIELDS if k in v15} == {"byt5_in_dim": 1472, "vision_in_dim": 1152,
                                                            "cond_type_embedding": True, "meanflow": True}
    assert v15["depth_single"] == 0 and v15["patch_size"] == [1, 1, 1] and v15["vec_in_dim"] is None


@pytest.fixture
def v15_file(rng, tmp_path):
    return _saved(get_preset("test-1.5"), rng, tmp_path, "v15.safetensors")


def _err(path):
    with pytest.raises(CheckpointError) as e:
        load_compressed(path)
    return str(e.value)


@pytest.mark.parametrize("field,value,expected", [
    ("byt5_in_dim", -4, "byt5_in_dim must be a positive integer or null, got -4"),
    ("byt5_in_dim", "1472", "byt5_in_dim must be a positive integer or null"),
    ("vision_in_dim", True, "vision_in_dim must be a positive integer or null, got True"),
    ("vision_in_dim", 0, "vision_in_dim must be a positive integer or null, got 0"),
    ("byt5_hidden", 2048.5, "byt5_hidden must be a positive integer"),
    ("cond_type_embedding", 1, "cond_type_embedding must be true or false, got 1"),
    ("meanflow", "no", "meanflow must be true or false"),
    ("time_r_dim", 7, "unknown config fields ['time_r_dim']"),
])
def test_bad_15_config_fields_are_refused_before_any_model_is_built(v15_file, tmp_path, field, value, expected):
    bad = _rewrite(v15_file, tmp_path / "bad.safetensors", edit_header=lambda h: h["config"].update({field: value}))
    msg = _err(bad)
    assert "has an invalid model config in its header" in msg and expected in msg, msg


def test_key_mismatch_names_the_files_variant(v15_file, tmp_path):
    dropped = _rewrite(v15_file, tmp_path / "dropped.safetensors", edit_tensors=lambda t: t.pop("byt5_in.fc2.weight"))
    msg = _err(dropped)
    assert "does not match the HunyuanVideo 1.5 model its header describes: 1 missing keys" in msg, msg
    assert "byt5_in.fc2.weight" in msg
    no_vision = _rewrite(v15_file, tmp_path / "nv.safetensors", edit_header=lambda h: h["config"].pop("vision_in_dim"))
    msg = _err(no_vision)  # the header now describes a model without vision_in: its eight tensors are extra
    assert "does not match the HunyuanVideo 1.5 model its header describes: 8 unexpected keys" in msg, msg


# ---- variants the format does not hold -------------------------------------------------------------------------------
UNSUPPORTED = {
    "HunyuanVideo 1.5 super-resolution": dataclasses.replace(get_preset("test-1.5"), in_channels=98),
    "SkyReels I2V": dataclasses.replace(get_preset("test"), in_channels=32),
    "HunyuanImage 2.1 refiner": dataclasses.replace(get_preset("test"), in_channels=128, out_channels=64,
                                                    patch_size=(1, 1, 1), vec_in_dim=None, guidance_embed=False),
}
SUPPORTED_TEXT = ("QuantSparse compressed checkpoints hold HunyuanVideo 1.0 T2V, HunyuanVideo 1.0 I2V, "
                  "HunyuanVideo 1.5 (T2V and I2V), Wan 2.1/2.2 T2V, Wan 2.1 I2V, Wan 2.2 I2V, Wan 2.2 TI2V 5B "
                  "transformers only")


@pytest.mark.parametrize("variant", list(UNSUPPORTED))
def test_unsupported_variants_are_neither_saved_nor_loaded(rng, tmp_path, monkeypatch, variant):
    config = UNSUPPORTED[variant]
    assert config.variant == variant
    with pytest.raises(ValueError) as e:
        _saved(config, rng, tmp_path)
    assert str(e.value) == f"cannot save a compressed checkpoint: the model is {variant}; {SUPPORTED_TEXT}"
    assert not list(tmp_path.iterdir())
    # A file that is consistent in every other respect (written with the check lifted) is refused at load.
    with monkeypatch.context() as m:
        m.setattr(ckpt, "LOADABLE", ckpt.LOADABLE + (variant,))
        path = _saved(config, rng, tmp_path)
        load_compressed(path)  # it is complete: only the variant is wrong
    assert _err(path) == f"{path}: the model is {variant}; {SUPPORTED_TEXT}"


def test_hunyuan_image_21_headers_are_refused_naming_it(v15_file, tmp_path):
    """HunyuanImage 2.1 (byT5 without type embeddings, a 2-D patch) cannot even be described by our config."""
    no_types = _rewrite(v15_file, tmp_path / "a.safetensors",
                        edit_header=lambda h: h["config"].update(cond_type_embedding=False, vision_in_dim=None))
    assert "(HunyuanImage 2.1 orders those tokens differently); unsupported" in _err(no_types)
    flat = _rewrite(v15_file, tmp_path / "b.safetensors", edit_header=lambda h: h["config"].update(patch_size=[1, 1]))
    assert "patch_size [1, 1] is an image model's 2-D patch (HunyuanImage 2.1), which QuantSparse does not support" \
        in _err(flat)

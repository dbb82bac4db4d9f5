"""Compressed Wan checkpoints through the model-family seam (models/family.py): the same file format and
loader as HunyuanVideo, a bit-exact round trip for each Wan variant, refusals for foreign Wan models and
forged headers. CPU, float32, small random-weight shapes."""
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from quantsparse_core.io import load_compressed, save_compressed
from quantsparse_core.io.checkpoint import CheckpointError, read_compressed
from quantsparse_core.models import HunyuanVideoDiT, get_preset
from quantsparse_core.models.family import HUNYUAN_VIDEO, WAN, family_of, family_of_state_dict
from quantsparse_core.models.wan import (WAN21_I2V, WAN22_I2V, WAN22_TI2V, WAN_T2V, WanConfig, WanDiT,
                                         get_wan_preset)
from quantsparse_core.models.wan_storage import CONTEXT_SUFFIXES, wan_policy
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import default_policy, quantize_model

BASE = get_wan_preset("wan-test")
VARIANTS = {
    WAN_T2V: BASE,
    WAN21_I2V: get_wan_preset("wan-test-i2v"),
    WAN22_I2V: dataclasses.replace(BASE, in_dim=36),
    WAN22_TI2V: dataclasses.replace(BASE, in_dim=48, out_dim=48),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_wan(rng, config: WanConfig) -> WanDiT:
    """Random weights that bf16 holds exactly (the file stores every float tensor in bf16)."""
    m = WanDiT(config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=rng) * 0.05).bfloat16().float())
    return m.eval()


def quantized_wan(rng, config, w_bits=4, a_bits=8):
    m = random_wan(rng, config)
    policy = default_policy(m, w_bits, a_bits)
    quantize_model(m, policy)
    with torch.no_grad():
        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.w_clip.uniform_(0.7, 1.0, generator=rng)
                q.a_clip.uniform_(0.7, 1.0, generator=rng)
                q.freeze()
    return m, policy


def wan_inputs(rng, config, batch=1):
    x = torch.randn(batch, config.in_dim, 2, 6, 8, generator=rng)
    t = torch.rand(batch, generator=rng) * 1000
    ctx = torch.randn(batch, 5, config.text_dim, generator=rng)
    clip = torch.randn(batch, 257, 1280, generator=rng) if config.model_type == "i2v" else None
    return x, t, ctx, clip


def test_family_seam_names_each_model_once():
    wan, hv = WanDiT(BASE, device="meta"), HunyuanVideoDiT(get_preset("test"), device="meta")
    assert family_of(wan) is WAN and family_of(BASE) is WAN and family_of("wan") is WAN
    assert family_of(hv) is HUNYUAN_VIDEO and family_of(get_preset("test")) is HUNYUAN_VIDEO
    with pytest.raises(ValueError, match="not a QuantSparse DiT"):
        family_of(torch.nn.Linear(2, 2))
    assert family_of_state_dict(wan.state_dict()) == (WAN, BASE)
    assert family_of_state_dict(hv.state_dict())[0] is HUNYUAN_VIDEO
    with pytest.raises(ValueError, match="neither a HunyuanVideo nor a Wan"):
        family_of_state_dict({"foo.weight": torch.zeros(1)})
    # Wan's policy: every block linear, context projections weight-only, nothing outside the blocks
    pol = default_policy(wan, 4, 8)
    assert pol == wan_policy(wan, 4, 8) and all(n.startswith("blocks.") for n in pol)
    assert {n for n, r in pol.items() if r.a_bits == 16} == {n for n in pol if n.endswith(CONTEXT_SUFFIXES)}
    with pytest.raises(ValueError, match="HunyuanVideo layer rules"):
        default_policy(wan, 4, 8, modulation_w_bits=8)


def test_variant_names():
    assert {c.variant for c in VARIANTS.values()} == set(VARIANTS)
    assert dataclasses.replace(BASE, in_dim=48).variant.startswith("a Wan model with 48 input channels")
    assert "unknown Wan configuration" in dataclasses.replace(BASE, num_heads=4).variant  # head width 64


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_bit_exact(rng, tmp_path, variant):
    config = VARIANTS[variant]
    m, policy = quantized_wan(rng, config)
    path = tmp_path / "wan.safetensors"
    save_compressed(m, path, policy, calibration={"method": "rtn"})
    loaded, header = load_compressed(path)
    assert header["model_family"] == "wan" and WanConfig.from_dict(header["config"]) == config
    assert isinstance(loaded, WanDiT)
    x, t, ctx, clip = wan_inputs(rng, config, batch=2)
    with torch.no_grad():
        want, got = m(x, t, ctx, clip), loaded(x, t, ctx, clip)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    # same packed integers, scales and bf16-exact floats: identical arithmetic, so equal to float32 rounding
    assert torch.allclose(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert isinstance(loaded.blocks[0].ffn[0], QuantLinear) and loaded.blocks[0].ffn[0].mode == "real"


def _rewrite_header(src, dst, edit):
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["quantsparse"])
    edit(header)
    save_file(tensors, str(dst), metadata={"quantsparse": json.dumps(header)})


@pytest.mark.parametrize("edit,message", [
    (lambda h: h.update(model_family="ltxv"), "'ltxv' model; QuantSparse loads 'hunyuan_video' and 'wan'"),
    (lambda h: h.update(model_family="hunyuan_video"), "invalid model config"),
    (lambda h: h["config"].update(dim=10**9), "dim must be an integer"),
    (lambda h: h["config"].update(num_heads=0), "invalid model config"),  # not a ZeroDivisionError
    (lambda h: h["config"].update(patch_size=[1, 0, 2]), "patch_size"),
    (lambda h: h["config"].update(model_type="s2v"), "model_type"),
    (lambda h: h["config"].update(eps=float("nan")), "eps must be a positive number"),
    (lambda h: h["config"].update(in_dim=20), "Wan model with 20 input channels"),
    (lambda h: h["config"].update(num_layers=3), "does not match"),
    (lambda h: h.update(config=[1, 2]), "invalid model config"),
])
def test_forged_wan_headers_fail_clearly(rng, tmp_path, edit, message):
    m, policy = quantized_wan(rng, BASE, 4, 16)
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_compressed(m, good, policy)
    _rewrite_header(good, bad, edit)
    with pytest.raises(CheckpointError, match=message):
        read_compressed(bad)


def test_foreign_wan_configurations_are_not_written(rng, tmp_path):
    m = WanDiT(dataclasses.replace(BASE, in_dim=48))  # Fun control: 48 channels in, 16 out
    policy = default_policy(m, 4, 8)
    quantize_model(m, policy)
    with pytest.raises(ValueError, match="cannot save a compressed checkpoint: the model is a Wan model with 48"):
        save_compressed(m, tmp_path / "x.safetensors", policy)
    assert not list(tmp_path.iterdir())

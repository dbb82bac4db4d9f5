"""Compressed checkpoint: bit-exact round trip, size as predicted, one clear error per bad file."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import quantsparse_core.models.weights as weights_mod
from quantsparse_core.io import load_compressed, save_compressed
from quantsparse_core.models import HunyuanVideoDiT, get_preset
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import default_policy, quantize_model, storage_bytes
from quantsparse_core.quant.transforms import kron_factors


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _random_model(rng):
    """Test-preset model with random weights that bf16 represents exactly (sources are bf16)."""
    m = HunyuanVideoDiT(get_preset("test"))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((torch.randn(p.shape, generator=rng) * 0.05).bfloat16().float())
    return m


def _quantized(rng, w_bits, a_bits, smooth=False, rotation=None, freeze=True):
    m = _random_model(rng)
    pol = default_policy(m, w_bits, a_bits)
    quantize_model(m, pol, smooth=smooth, rotation=rotation)
    with torch.no_grad():
        for q in m.modules():
            if isinstance(q, QuantLinear):
                q.w_clip.uniform_(0.7, 1.0, generator=rng)
                q.a_clip.uniform_(0.7, 1.0, generator=rng)
                if q.log_smooth is not None:
                    q.log_smooth.copy_(torch.randn(q.in_features, generator=rng) * 0.3)
                for f in (q.r1, q.r2):
                    if f is not None:
                        f.param.copy_(torch.randn(f.param.shape, generator=rng) * 0.2)
                if freeze:
                    q.freeze()
    return m.eval(), pol


def _inputs(rng):
    return (torch.randn(1, 16, 2, 8, 8, generator=rng), torch.tensor([500.0]),
            torch.randn(1, 5, 32, generator=rng), torch.randn(1, 768, generator=rng), torch.tensor([6.0]))


def _extra_bytes(model, pol):
    """fp32 tensors beyond storage_bytes' count: act clips, smoothing vectors, rotation factors."""
    n = 0
    for name, rule in pol.items():
        q = model.get_submodule(name)
        n += 4 * (rule.a_bits < 16)
        n += 4 * q.in_features * (q.log_smooth is not None)
        if q.rotation:
            n1, n2 = kron_factors(q.in_features)
            n += 4 * (n1 * n1 + n2 * n2)
    return n


@pytest.mark.parametrize("w_bits,a_bits,smooth,rotation", [(4, 8, False, None), (8, 8, True, "learned")])
def test_round_trip_is_bit_exact(rng, tmp_path, w_bits, a_bits, smooth, rotation):
    m, pol = _quantized(rng, w_bits, a_bits, smooth, rotation)
    path = tmp_path / "m.safetensors"
    save_compressed(m, path, pol, calibration={"steps": 3, "loss": 0.1}, source_hash="sha256:abc")
    loaded, header = load_compressed(path)
    assert header["policy"] == {k: {"w_bits": r.w_bits, "a_bits": r.a_bits} for k, r in pol.items()}
    assert header["calibration"] == {"steps": 3, "loss": 0.1} and header["source_hash"] == "sha256:abc"
    for name in pol:
        a, b = m.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(b, QuantLinear) and b.mode == "real" and b.rotation == a.rotation
        assert b.w_packed.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
        assert torch.equal(a.w_packed, b.w_packed) and torch.equal(a.w_scale, b.w_scale)
    args = _inputs(rng)
    with torch.no_grad():
        assert torch.equal(m(*args), loaded(*args))

    # Size: storage_bytes' payload + the fp32 transform tensors, exactly; header only a few KB.
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
    predicted = storage_bytes(HunyuanVideoDiT(get_preset("test"), device="meta"), pol)["total"]
    assert os.path.getsize(path) - 8 - header_len == predicted + _extra_bytes(m, pol)
    assert header_len < 32_000


def test_fake_mode_model_is_frozen_on_a_copy(rng, tmp_path):
    m, pol = _quantized(rng, 4, 8, smooth=True, rotation="hadamard", freeze=False)
    path = tmp_path / "m.safetensors"
    save_compressed(m, path, pol)
    assert all(m.get_submodule(n).mode == "fake" for n in pol)  # caller's model untouched
    loaded, _ = load_compressed(path)
    for q in m.modules():
        if isinstance(q, QuantLinear):
            q.freeze()
    args = _inputs(rng)
    with torch.no_grad():
        assert torch.equal(m(*args), loaded(*args))


# -- bad files ---------------------------------------------------------------------------------------

def _rewrite(src, dst, edit_header=None, edit_tensors=None):
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["quantsparse"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(dst), metadata={"quantsparse": json.dumps(header)})
    return dst


@pytest.fixture
def saved(rng, tmp_path):
    m, pol = _quantized(rng, 4, 8)
    path = tmp_path / "good.safetensors"
    save_compressed(m, path, pol)
    return path


def test_bad_files_each_get_a_clear_error(saved, tmp_path, rng):
    def err(path):
        with pytest.raises(ValueError) as e:
            load_compressed(path)
        return str(e.value)

    cut = tmp_path / "cut.safetensors"
    data = saved.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    assert "not a readable safetensors file" in err(cut)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.randn(3, 4, generator=rng)}, str(foreign))
    assert "not a QuantSparse compressed checkpoint" in err(foreign)

    plain = tmp_path / "plain.safetensors"
    save_file({k: v.bfloat16() for k, v in _random_model(rng).state_dict().items()}, str(plain))
    assert "not a QuantSparse compressed checkpoint" in err(plain)

    v2 = _rewrite(saved, tmp_path / "v2.safetensors", edit_header=lambda h: h.update(version=2))
    assert "written by format version 2; this QuantSparse reads version 1: update QuantSparse" in err(v2)

    wan = _rewrite(saved, tmp_path / "wan.safetensors", edit_header=lambda h: h.update(model_family="wan"))
    assert "invalid model config" in err(wan)  # a HunyuanVideo config under the Wan family name
    ltx = _rewrite(saved, tmp_path / "ltx.safetensors", edit_header=lambda h: h.update(model_family="ltxv"))
    assert "'ltxv' model" in err(ltx)

    removed = _rewrite(saved, tmp_path / "removed.safetensors",
                       edit_tensors=lambda t: t.pop("single_blocks.0.linear2.weight_scale"))
    msg = err(removed)
    assert "1 missing keys" in msg and "single_blocks.0.linear2.weight_scale" in msg

    def reshape(t):
        t["final_layer.linear.weight"] = t["final_layer.linear.weight"][:-1]
    shaped = _rewrite(saved, tmp_path / "shape.safetensors", edit_tensors=reshape)
    msg = err(shaped)
    assert "1 wrong shapes" in msg and "final_layer.linear.weight" in msg

    def retype(t):
        t["double_blocks.0.img_attn.qkv.weight_scale"] = t["double_blocks.0.img_attn.qkv.weight_scale"].bfloat16()
    typed = _rewrite(saved, tmp_path / "dtype.safetensors", edit_tensors=retype)
    assert "1 wrong dtypes" in err(typed)

    def bits(h):
        h["policy"]["single_blocks.0.linear1"]["w_bits"] = 3
    bad_bits = _rewrite(saved, tmp_path / "bits.safetensors", edit_header=bits)
    assert "invalid layer policy" in err(bad_bits) and "weight bits 3" in err(bad_bits)


def test_failed_save_leaves_nothing_behind(rng, tmp_path, monkeypatch):
    m, pol = _quantized(rng, 4, 8)

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(weights_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(m, tmp_path / "m.safetensors", pol)
    assert list(tmp_path.iterdir()) == []

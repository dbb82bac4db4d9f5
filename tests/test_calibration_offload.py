"""One-block-on-the-accelerator calibration: same result as in-place, other blocks never moved."""
import copy

import pytest
import torch

from quantsparse_core.calib.calibrate import CalibSettings, calibrate
from quantsparse_core.calib.capture import block_list, capture_embedded
from quantsparse_core.models.tiny.embedded import load_embedded


@pytest.fixture(scope="module")
def data():
    model, _ = load_embedded()
    return model, capture_embedded(model, n_samples=2, steps=4, per_trajectory=2, seed=5)


def test_offload_and_recompute_equal_in_place_and_leave_other_blocks_alone(data, monkeypatch):
    model, cap = data
    only = ["double_blocks.1", "single_blocks.0"]
    settings = CalibSettings(method="msad", epochs=2)
    ref = copy.deepcopy(model)
    calibrate(ref, cap, settings, only=only)

    off = copy.deepcopy(model)
    originals = {id(b): f"{k}_blocks.{i}" for k, i, b in block_list(off)}
    originals.update({id(m): "other" for n, m in off.named_children() if n not in ("double_blocks", "single_blocks")})
    moved, ran = [], []
    real_to = torch.nn.Module.to

    def spy_to(self, *a, **kw):                  # any .to() on a module the model owns is a move
        if id(self) in originals:
            moved.append(originals[id(self)])
        return real_to(self, *a, **kw)
    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    hooks = [b.register_forward_pre_hook(lambda m, a, n=n, b=b: ran.append(n) if m is b else None)
             for n, b in ((f"{k}_blocks.{i}", b) for k, i, b in block_list(off))]
    calibrate(off, cap, settings, only=only, device="cpu", msad_targets="recompute")
    for h in hooks:
        h.remove()
    assert moved == [] and ran == []             # only copies of the current block moved/ran (hooks are copied too, hence `m is b`)
    assert all(p.device.type == "cpu" for p in off.parameters())
    a, b = ref.state_dict(), off.state_dict()
    assert a.keys() == b.keys()
    for key in a:                                # same ops in the same order on CPU: bit-identical
        assert torch.equal(a[key], b[key]), key


def test_bad_msad_targets(data):
    model, cap = data
    with pytest.raises(ValueError, match="msad_targets 'disk' unknown"):
        calibrate(copy.deepcopy(model), cap, CalibSettings(method="rtn"), msad_targets="disk")

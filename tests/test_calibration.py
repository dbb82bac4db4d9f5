"""MSAD losses against direct full computations; calibration beats RTN; resume == uninterrupted."""
import copy
import math

import pytest
import torch

from quantsparse_core.calib import msad
from quantsparse_core.calib.calibrate import CalibSettings, block_output_mse, calibrate
from quantsparse_core.calib.capture import capture_embedded
from quantsparse_core.models.tiny.embedded import load_embedded


def _qk(rng, b=1, h=2, l=70, d=16, n_pad=3):
    q = torch.randn(b, h, l, d, generator=rng, dtype=torch.float64)
    k = torch.randn(b, h, l, d, generator=rng, dtype=torch.float64)
    mask = torch.zeros(b, 1, l, dtype=torch.float64)
    mask[:, 0, 5:5 + n_pad] = -torch.finfo(torch.float64).max  # padded text tokens
    return q, k, mask


def test_global_attention_equals_explicit_pooling(rng):
    q, k, mask = _qk(rng)
    stride = 16
    got = msad.global_attention(q, k, mask, stride)
    valid = (mask[0, 0] > -1)
    pooled_q, pooled_k = [], []
    for start in range(0, q.shape[2], stride):          # last window partial: 70 = 4 * 16 + 6
        sel = torch.arange(start, min(start + stride, q.shape[2]))
        sel = sel[valid[sel]]
        pooled_q.append(q[0, :, sel].mean(1))
        pooled_k.append(k[0, :, sel].mean(1))
    qp, kp = torch.stack(pooled_q, 1), torch.stack(pooled_k, 1)
    ref = torch.softmax(qp @ kp.transpose(-1, -2) / math.sqrt(16), -1)
    assert got.shape == (1, 2, math.ceil(70 / stride), math.ceil(70 / stride))
    torch.testing.assert_close(got[0], ref, atol=1e-12, rtol=0)


def test_saliency_and_local_attention_equal_full_matrix(rng):
    q, k, mask = _qk(rng)
    full = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + mask[:, :, None, :], -1)   # [1, H, L, L]
    sal_ref = full.sum(dim=(1, 2))
    torch.testing.assert_close(msad.key_saliency(q, k, mask, tile=16).double(), sal_ref, atol=1e-5, rtol=1e-6)
    idx = msad.salient_indices(q, k, mask, top_k=10, tile=16)
    assert set(idx[0].tolist()) == set(sal_ref[0].topk(10).indices.tolist())
    assert not set(idx[0].tolist()) & {5, 6, 7}          # masked keys receive no attention
    torch.testing.assert_close(msad.local_attention(q, k, mask, idx), full[:, :, idx[0]], atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def calib_data():
    model, _ = load_embedded()
    return model, capture_embedded(model, n_samples=4, steps=6, per_trajectory=2, seed=3)


def test_calibration_lowers_block_error_below_rtn(calib_data):
    model, cap = calib_data
    only = ["double_blocks.1", "single_blocks.0"]
    rtn = calibrate(copy.deepcopy(model), cap, CalibSettings(method="rtn"), only=only)
    msad_report = calibrate(copy.deepcopy(model), cap, CalibSettings(method="msad", epochs=3), only=only)
    for name in only:
        assert msad_report[name]["quant"] < rtn[name]["quant"], (name, msad_report[name], rtn[name])


def test_resume_gives_the_same_result_as_an_uninterrupted_run(calib_data, tmp_path):
    model, cap = calib_data
    only = ["double_blocks.0", "double_blocks.1"]
    settings = CalibSettings(method="block+local", epochs=2)
    whole = copy.deepcopy(model)
    calibrate(whole, cap, settings, only=only)

    def stop_in_second_block(block_i, n, epoch, loss):
        if block_i == 1:
            raise KeyboardInterrupt

    first = copy.deepcopy(model)
    with pytest.raises(KeyboardInterrupt):
        calibrate(first, cap, settings, checkpoint_dir=tmp_path, progress=stop_in_second_block, only=only)
    assert (tmp_path / "double_blocks.0.safetensors").exists()
    assert not (tmp_path / "double_blocks.1.safetensors").exists()
    resumed = copy.deepcopy(model)
    calls = []
    calibrate(resumed, cap, settings, checkpoint_dir=tmp_path, progress=lambda *a: calls.append(a[0]), only=only)
    assert 0 not in calls                       # block 0 was not trained again
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_refuses_other_settings(calib_data, tmp_path):
    model, cap = calib_data
    calibrate(copy.deepcopy(model), cap, CalibSettings(method="rtn"), checkpoint_dir=tmp_path,
              only=["double_blocks.0"])
    with pytest.raises(ValueError, match="other settings"):
        calibrate(copy.deepcopy(model), cap, CalibSettings(method="rtn", w_bits=8), checkpoint_dir=tmp_path)


def test_bad_settings():
    with pytest.raises(ValueError, match="method 'gptq' unknown"):
        CalibSettings(method="gptq")
    with pytest.raises(ValueError, match="weight bits 3"):
        CalibSettings(w_bits=3)


def test_calibration_latent_shape_is_checked():
    from quantsparse_core.calib.capture import check_calibration_latent
    from quantsparse_core.models import HunyuanVideoDiT, get_preset

    model = HunyuanVideoDiT(get_preset("tiny"), device="meta")
    assert check_calibration_latent(model, (16, 8, 32, 32)) == (8, 16, 16)
    with pytest.raises(ValueError, match="channels"):
        check_calibration_latent(model, (4, 8, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        check_calibration_latent(model, (16, 8, 31, 32))
    with pytest.raises(ValueError, match="channels, frames, height, width"):
        check_calibration_latent(model, (16, 32, 32))


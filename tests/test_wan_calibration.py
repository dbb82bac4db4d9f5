"""MSAD calibration on a Wan transformer (calib/wan_calibration.py + the shared block loop), float32 on the CPU:
calibration beats round-to-nearest on every block's output error, the captured steps follow the schedule and
the expert segment, I2V conditioning reaches the blocks, and the calibrated model saves and loads exactly."""
import copy

import pytest
import torch

from quantsparse_core.calib.calibrate import CalibSettings, calibrate
from quantsparse_core.calib.capture import WAN_KIND, block_list, block_name
from quantsparse_core.calib.wan_calibration import (WanConditioning, calibrate_wan, capture_wan, sample_wan,
                                                     segment_steps)
from quantsparse_core.io import load_compressed, save_compressed
from quantsparse_core.models.sampler import flow_sigmas
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.policy import default_policy

from test_wan_sparse import random_model

LATENT = (16, 2, 8, 8)  # -> grid 2 x 4 x 4 = 32 video tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def t2v(rng):
    return random_model(rng, "wan-test", qk_gain=1.0), WanConditioning(torch.randn(1, 7, 4096, generator=rng))


@pytest.fixture(scope="module")
def captured():
    rng = torch.Generator().manual_seed(11)
    model, cond = t2v(rng)
    return model, cond, capture_wan(model, cond, LATENT, n_samples=4, steps=6, per_trajectory=2, seed=3)


def test_blocks_are_listed_and_named_as_the_state_dict_names_them(captured):
    model, _, cap = captured
    blocks = block_list(model)
    assert [(k, i) for k, i, _ in blocks] == [(WAN_KIND, 0), (WAN_KIND, 1)]
    assert [block_name(k, i) for k, i, _ in blocks] == ["blocks.0", "blocks.1"]
    assert set(cap) == {(WAN_KIND, 0), (WAN_KIND, 1)} and all(len(v) == 4 for v in cap.values())
    x, e, rope, text, image = cap[(WAN_KIND, 0)][0].args
    assert x.shape == (1, 32, 256) and text.shape == (1, 7, 256) and image is None


def test_msad_beats_round_to_nearest_on_every_block(captured):
    model, _, cap = captured
    rtn = calibrate(copy.deepcopy(model), cap, CalibSettings(method="rtn"))
    msad = calibrate(copy.deepcopy(model), cap, CalibSettings(method="msad", epochs=3, stride=8, top_k=8))
    assert set(msad) == {"blocks.0", "blocks.1"}
    for name in msad:
        assert msad[name]["quant"] < rtn[name]["quant"], (name, msad[name], rtn[name])
        assert {"final_quant", "final_global", "final_local"} <= set(msad[name])  # both MSAD terms trained


def test_calibrated_model_round_trips_through_the_file(captured, tmp_path, rng):
    model, cond, cap = captured
    q = copy.deepcopy(model)
    with torch.no_grad():  # the file keeps unquantized tensors in bf16: start from bf16-exact weights
        for p in q.parameters():
            p.copy_(p.bfloat16().float())
    policy = default_policy(q, 4, 8)
    report = calibrate(q, cap, CalibSettings(method="msad", epochs=1, stride=8, top_k=8))
    assert all(isinstance(m, QuantLinear) for n, m in q.named_modules() if n.endswith("ffn.0"))
    save_compressed(q, tmp_path / "wan.safetensors", policy, calibration={"report": report})
    assert_file_runs_as(q, tmp_path / "wan.safetensors", cond.context, rng)


def assert_file_runs_as(model, path, context, rng, timestep=700.0):
    """The compressed file at `path`, loaded, gives `model`'s output (its fake-quantized layers frozen) on a fresh
    random latent, to float32 rounding of the same operations (1e-5 of the output's largest value)."""
    loaded, _ = load_compressed(path)
    x = torch.randn(1, *LATENT, generator=rng)
    t = torch.tensor([timestep])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.mode != "real":
                m.freeze()
        want, got = model(x, t, context), loaded(x, t, context)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    return loaded


def test_expert_segments_capture_only_their_steps(rng):
    high, cond = t2v(rng)
    low = random_model(rng, "wan-test", qk_gain=1.0)
    sigmas = flow_sigmas(8, 8.0)
    boundary = 0.875  # Wan 2.2 A14B T2V's switch from the high-noise to the low-noise expert
    seen = []
    low_steps = segment_steps(sigmas, (0.0, boundary))
    assert low_steps and all(float(sigmas[i]) < boundary for i in low_steps)
    assert segment_steps(sigmas, (boundary, 1.01)) == [i for i in range(8) if i not in low_steps]

    def expert(sigma):
        seen.append(sigma)
        return high if sigma >= boundary else low
    cap = capture_wan(low, cond, LATENT, n_samples=3, steps=8, per_trajectory=3, seed=0,
                      sigma_range=(0.0, boundary), expert=expert)
    assert len(seen) == 8 and any(s >= boundary for s in seen)  # the high-noise expert ran its steps
    assert all(len(v) == 3 for v in cap.values())
    # the low-noise expert's first captured inputs are the state the high-noise expert handed over: the same
    # trajectory run by hand up to that step, then block 0's input computed from it
    first = low_steps[0]
    assert cap[(WAN_KIND, 0)][0].call.step.index == first
    from quantsparse_core.models.sampler import initial_noise
    noise = initial_noise((1, *LATENT), 0)
    state = sample_wan(low, noise, cond, sigmas[: first + 1], expert=expert)  # steps 0..first-1
    got = {}
    h = low.blocks[0].register_forward_pre_hook(lambda mod, args: got.update(x=args[0]))  # returns None
    with torch.no_grad():
        low(state, torch.tensor([float(sigmas[first]) * 1000]), cond.context)
    h.remove()
    torch.testing.assert_close(cap[(WAN_KIND, 0)][0].args[0], got["x"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no step of a 8-step schedule"):
        capture_wan(low, cond, LATENT, n_samples=2, steps=8, sigma_range=(0.999, 1.0))


def test_i2v_conditioning_reaches_the_blocks(rng):
    model = random_model(rng, "wan-test-i2v", qk_gain=1.0)
    cond = WanConditioning(torch.randn(1, 5, 4096, generator=rng), clip_fea=torch.randn(1, 257, 1280, generator=rng),
                           concat=torch.randn(1, 20, 2, 8, 8, generator=rng))
    report = calibrate_wan(model, cond, LATENT, CalibSettings(method="block", epochs=1), n_samples=2, steps=4,
                           per_trajectory=2)
    assert set(report) == {"blocks.0", "blocks.1"}
    with pytest.raises(ValueError, match="latent has 16 channels; this model takes 36"):
        capture_wan(model, WanConditioning(cond.context, cond.clip_fea), LATENT, n_samples=1, steps=2)

"""Streaming calibration of a Wan transformer (calib/stream_pipeline.compress_streaming with a Wan BlockSource),
float32 on the CPU: the same file, byte for byte, as the in-memory path (wan_calibration's capture +
calibrate.calibrate + io.save_compressed, block inputs in contiguous memory) with FP-propagated block inputs, for
T2V, I2V and a Wan 2.2 expert segment, and within a stated tolerance of calibrate_wan as it stands; the file loads
as a WanDiT under the "wan" family; one block is built at a time; a cancelled job resumes after its last
finished block and writes the same file."""
import json

import pytest
import torch
from safetensors import safe_open

from quantsparse_core.calib.block_source import SafetensorsSource, StateDictSource
from quantsparse_core.calib.calibrate import CalibSettings, calibrate
from quantsparse_core.calib.pipeline import state_dict_hash
from quantsparse_core.calib.stream_budget import estimate
from quantsparse_core.calib.stream_pipeline import WanSchedule, compress_streaming
from quantsparse_core.calib.wan_calibration import WanConditioning, calibrate_wan, capture_wan
from quantsparse_core.io import load_compressed, save_compressed
from quantsparse_core.io.checkpoint import HEADER_KEY
from quantsparse_core.models.wan import WanDiT, wan_config_from_state_dict
from quantsparse_core.models.weights import atomic_save_safetensors
from quantsparse_core.quant.policy import default_policy

from test_calibration_streaming import Spy, cancelled_in_second_block
from test_wan_calibration import assert_file_runs_as
from test_wan_sparse import random_model

LATENT = (16, 2, 8, 8)          # noisy latent -> grid 2 x 4 x 4 = 32 video tokens
KW = dict(n_samples=2, steps=3, seed=7)
MSAD = CalibSettings(method="msad", epochs=1, stride=8, top_k=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _weights(rng, preset="wan-test"):
    """A random Wan state dict whose values bf16 holds exactly (the file keeps unquantized tensors in bf16)."""
    model = random_model(rng, preset, qk_gain=1.0)
    return {k: v.detach().bfloat16().float().clone() for k, v in model.state_dict().items()}


def _t2v(rng):
    return WanConditioning(torch.randn(1, 7, 4096, generator=rng))


def _i2v(rng):
    return WanConditioning(torch.randn(1, 5, 4096, generator=rng), clip_fea=torch.randn(1, 257, 1280, generator=rng),
                           concat=torch.randn(1, 20, *LATENT[1:], generator=rng))


def _model(sd):
    model = WanDiT(wan_config_from_state_dict(sd))
    model.load_state_dict(sd)
    return model.eval()


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[HEADER_KEY])


def _in_memory(sd, cond, path, settings, calibration, n_samples, steps, seed, contiguous=True, expert_for=None,
               **wan_kw):
    """The in-memory path (wan_calibration's capture + calibrate.calibrate + save_compressed), with the header's
    calibration entry taken from the streamed file (its content is checked separately) so that the files are
    comparable byte for byte. contiguous: hand the blocks their captured inputs in contiguous memory, as the
    streamed capture stores them. WanDiT.patchify gives block 0 a transposed view (strides (L*C, 1, L)), and
    float32 matmuls on it round differently (~1e-7 relative) from the same values laid out contiguously;
    calibrate_wan itself (contiguous=False) is compared within a tolerance. Returns (model, report)."""
    model = _model(sd)
    policy = default_policy(model, settings.w_bits, settings.a_bits)
    if expert_for is not None:   # expert_for(model) -> expert(sigma): the trajectory's model per step
        wan_kw["expert"] = expert_for(model)
    if contiguous:
        captured = capture_wan(model, cond, LATENT, n_samples, steps, seed=seed, **wan_kw)
        for samples in captured.values():
            for smp in samples:
                smp.args = tuple(a.contiguous() if torch.is_tensor(a) else a for a in smp.args)
        report = calibrate(model, captured, settings)
    else:
        report = calibrate_wan(model, cond, LATENT, settings, n_samples=n_samples, steps=steps, seed=seed, **wan_kw)
    save_compressed(model, path, policy, calibration=calibration, source_hash=state_dict_hash(sd))
    return model, report


def test_streamed_wan_file_equals_the_in_memory_calibration_and_loads_as_wan(rng, tmp_path):
    sd, cond = _weights(rng), _t2v(rng)
    streamed, whole = tmp_path / "s" / "wan.safetensors", tmp_path / "w" / "wan.safetensors"
    src = Spy(sd)
    policy, report = compress_streaming(src, cond, LATENT, streamed, MSAD, **KW)
    assert src.peak == 1                               # never two blocks built at once
    assert src.built == 1 * 3 * 2 + 2                  # capture: 1 trajectory x 3 steps x 2 blocks; then 1 per block
    assert not (streamed.parent / ".quantsparse-partial").exists()
    head = _header(streamed)
    assert head["model_family"] == "wan" and head["config"]["dim"] == 256
    cal = head["calibration"]
    assert cal["data"]["shift"] == 8.0 and cal["data"]["sigma_range"] is None
    model, want = _in_memory(sd, cond, whole, MSAD, cal, **KW)
    assert cal["final_losses"] == want == report       # the same losses, read back exactly from JSON
    assert set(report) == {"blocks.0", "blocks.1"} and {"final_global", "final_local"} <= set(report["blocks.0"])
    assert whole.read_bytes() == streamed.read_bytes()  # tensors and header, byte for byte

    assert isinstance(assert_file_runs_as(model, streamed, cond.context, rng, 640.0), WanDiT)

    # calibrate_wan itself, with no contiguous copies: WanDiT.patchify hands block 0 contiguous tokens, so the
    # in-memory path's own captures give the same file byte for byte too
    plain = tmp_path / "p" / "wan.safetensors"
    _in_memory(sd, cond, plain, MSAD, cal, contiguous=False, **KW)
    assert plain.read_bytes() == streamed.read_bytes()


def test_cancelled_wan_job_resumes_after_its_last_finished_block(rng, tmp_path):
    sd, cond = _weights(rng), _t2v(rng)
    settings = CalibSettings(method="block+local", epochs=1, top_k=8)
    ref, out, partial = cancelled_in_second_block(sd, cond, LATENT, settings, tmp_path, "wan.safetensors", **KW)
    assert (partial / "blocks.0.safetensors").exists()
    assert not (partial / "blocks.1.safetensors").exists()
    # the second run reads the weights from a file, block by block: the same job (same fingerprint)
    weights = tmp_path / "wan_dit.safetensors"
    atomic_save_safetensors(sd, weights)
    file_src = SafetensorsSource(weights)
    assert file_src.fingerprint() == state_dict_hash(sd)
    built, seen = [], []
    orig = file_src.block
    file_src.block = lambda *a, **k: built.append(a[:2]) or orig(*a, **k)
    compress_streaming(file_src, cond, LATENT, out, settings, progress=lambda b, n, e, l: seen.append((b, l)),
                       host_budget=1, **KW)   # and every block's data go to disk
    assert built == [("wan", 0), ("wan", 1)]   # replay block 0, calibrate block 1: the capture was reused
    assert seen[0] == (0, None) and [b for b, loss in seen if b == 1]  # block 0: one replay tick, no training
    assert ref.read_bytes() == out.read_bytes()


def test_wan_i2v_streams_with_clip_tokens_and_concatenated_channels(rng, tmp_path):
    sd, cond = _weights(rng, "wan-test-i2v"), _i2v(rng)
    settings = CalibSettings(method="block", epochs=1)
    streamed, whole = tmp_path / "s" / "i2v.safetensors", tmp_path / "w" / "i2v.safetensors"
    _, report = compress_streaming(StateDictSource(sd), cond, LATENT, streamed, settings, **KW)
    head = _header(streamed)
    assert head["model_family"] == "wan" and head["config"]["model_type"] == "i2v" and head["config"]["in_dim"] == 36
    _, want = _in_memory(sd, cond, whole, settings, head["calibration"], **KW)
    assert report == want
    assert whole.read_bytes() == streamed.read_bytes()
    loaded, _ = load_compressed(streamed)
    assert isinstance(loaded, WanDiT) and loaded.img_emb is not None
    with pytest.raises(ValueError, match="latent has 16 channels; this model takes 36"):
        compress_streaming(StateDictSource(sd), WanConditioning(cond.context, cond.clip_fea), LATENT,
                           tmp_path / "x.safetensors", settings, **KW)
    with pytest.raises(ValueError, match="WanConditioning"):
        from quantsparse_core.calib.pipeline import Conditioning
        compress_streaming(StateDictSource(sd), Conditioning(cond.context, None, None), LATENT,
                           tmp_path / "x.safetensors", settings, **KW)


def test_wan22_expert_segment_streams_like_the_in_memory_path(rng, tmp_path):
    low_sd, high_sd, cond = _weights(rng), _weights(rng), _t2v(rng)
    boundary, steps = 0.875, 10   # the low-noise expert serves steps 6-9, below the T2V boundary
    settings = CalibSettings(method="block", epochs=1)
    low_src, high_src = StateDictSource(low_sd), StateDictSource(high_sd)
    schedule = WanSchedule(sigma_range=(0.0, boundary), expert=lambda s: high_src if s >= boundary else low_src)
    streamed, whole = tmp_path / "s" / "low.safetensors", tmp_path / "w" / "low.safetensors"
    _, report = compress_streaming(low_src, cond, LATENT, streamed, settings, n_samples=3, steps=steps, seed=2,
                                   wan_schedule=schedule)
    cal = _header(streamed)["calibration"]
    assert cal["data"]["sigma_range"] == [0.0, boundary] and cal["data"]["experts"] == [state_dict_hash(high_sd)]
    high = _model(high_sd)
    _, want = _in_memory(low_sd, cond, whole, settings, cal, 3, steps, 2, sigma_range=(0.0, boundary),
                         expert_for=lambda low: lambda s: high if s >= boundary else low)
    assert report == want
    assert whole.read_bytes() == streamed.read_bytes()
    wrong = WanSchedule(sigma_range=(0.0, boundary), expert=lambda s: high_src)   # low never runs its steps
    with pytest.raises(ValueError, match="captured 0 of 3 samples"):
        compress_streaming(low_src, cond, LATENT, tmp_path / "z" / "z.safetensors", settings, n_samples=3, steps=steps,
                           wan_schedule=wrong)
    with pytest.raises(ValueError, match="no step of a 10-step schedule"):
        compress_streaming(low_src, cond, LATENT, tmp_path / "y.safetensors", settings, n_samples=2, steps=steps,
                           wan_schedule=WanSchedule(sigma_range=(0.999, 1.0)))
    assert not any((tmp_path / "y.safetensors").parent.glob(".quantsparse-partial"))


def test_wan_estimate_counts_video_tokens_and_refuses_before_work(rng, tmp_path):
    sd, cond = _weights(rng), _t2v(rng)
    src = StateDictSource(sd)
    est = estimate(src.config, LATENT, 7, 2, 3, MSAD)
    assert est["tokens"] == 2 * 4 * 4                     # self-attention sees the video tokens only
    assert est["host_capture_bytes"] >= 2 * 32 * 256 * 4  # at least the two samples' hidden states
    with pytest.raises(MemoryError, match="smaller calibration latent"):
        compress_streaming(src, cond, LATENT, tmp_path / "m.safetensors", MSAD, gpu_budget=1000, **KW)
    assert not any(tmp_path.rglob("*.bin")) and not any(tmp_path.rglob("*.safetensors"))

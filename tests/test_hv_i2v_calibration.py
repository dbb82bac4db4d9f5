"""MSAD calibration of HunyuanVideo 1.0 I2V ("v1 (concat)"): the image latent + mask channels ride along every
trajectory call (Conditioning.concat), the streamed job writes a file that loads as the I2V model, and the
channels are part of what identifies the job. CPU, float32, small random-weight shapes."""
import torch

from quantsparse_core.calib.block_source import StateDictSource
from quantsparse_core.calib.calibrate import CalibSettings
from quantsparse_core.calib.pipeline import Conditioning
from quantsparse_core.calib.stream_capture import trajectory_runner
from quantsparse_core.calib.stream_pipeline import compress_streaming, job_data
from quantsparse_core.io import load_compressed
from quantsparse_core.models import HunyuanVideoDiT, get_preset

LATENT = (16, 2, 8, 8)  # the noisy latent; the model reads 16 + 17 = 33 channels


def i2v_weights(rng):
    m = HunyuanVideoDiT(get_preset("test-i2v"))
    return {k: (torch.randn(v.shape, generator=rng) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}


def cond(rng, concat=True):
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 5:] = 0
    return Conditioning(torch.randn(1, 7, 32, generator=rng), torch.randn(1, 768, generator=rng), mask, 6.0,
                        torch.randn(1, 17, 2, 8, 8, generator=rng) if concat else None)


def test_the_trajectory_feeds_the_image_channels_at_every_step(rng):
    model = HunyuanVideoDiT(get_preset("test-i2v"))
    c = cond(rng)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    trajectory_runner(model, c, LATENT, steps=3, seed=0, n_traj=1)(0, lambda step: None)
    assert len(seen) == 3 and all(x.shape == (1, 33, 2, 8, 8) for x in seen)
    assert all(torch.equal(x[:, 16:], c.concat) for x in seen)
    assert not torch.equal(seen[0][:, :16], seen[1][:, :16])  # the noisy part moves, the image part stays


def test_streamed_i2v_calibration_writes_an_i2v_checkpoint(rng, tmp_path):
    sd, c = i2v_weights(rng), cond(rng)
    out = tmp_path / "i2v.safetensors"
    settings = CalibSettings(method="msad", epochs=1, stride=16, top_k=16)
    _, report = compress_streaming(StateDictSource(sd), c, LATENT, out, settings, n_samples=2, steps=3, seed=0)
    model, header = load_compressed(out)
    assert model.config.variant == "HunyuanVideo 1.0 I2V" and header["model_family"] == "hunyuan_video"
    assert set(report) == {"double_blocks.0", "single_blocks.0"}
    x = torch.randn(1, 33, 2, 8, 8, generator=rng)
    with torch.no_grad():
        y = model(x, torch.tensor([500.0]), c.context, c.pooled, attention_mask=c.mask)
    assert y.shape == (1, 16, 2, 8, 8) and torch.isfinite(y).all()
    # the image channels identify the job (resume folder, header): another image is another job
    other = Conditioning(c.context, c.pooled, c.mask, c.guidance, torch.zeros_like(c.concat))
    assert job_data(c, LATENT, 2, 3, 0)["prompt"] != job_data(other, LATENT, 2, 3, 0)["prompt"]


def test_i2v_without_its_image_channels_is_refused_with_the_fix(rng, tmp_path):
    import pytest
    with pytest.raises(ValueError, match="latent has 16 channels; this model takes 33.*concatenate"):
        compress_streaming(StateDictSource(i2v_weights(rng)), cond(rng, concat=False), LATENT,
                           tmp_path / "x.safetensors", CalibSettings(method="rtn"), n_samples=1, steps=2)
    assert not (tmp_path / "x.safetensors").exists()


def test_streamed_15_calibration_feeds_byt5_and_image_tokens(rng, tmp_path):
    """HunyuanVideo 1.5: the byT5 and image tokens (Conditioning.tokens) and the 33 image + mask channels reach
    every trajectory call; the file loads as the 1.5 model and the tokens identify the job."""
    m = HunyuanVideoDiT(get_preset("test-1.5"))
    sd = {k: (torch.randn(v.shape, generator=rng) * 0.05).to(torch.bfloat16) for k, v in m.state_dict().items()}
    tokens = {"txt_byt5": torch.randn(1, 3, 1472, generator=rng), "clip_fea": torch.randn(1, 4, 1152, generator=rng)}
    c = Conditioning(torch.randn(1, 7, 32, generator=rng), None, None, 6.0,
                     torch.randn(1, 33, 2, 8, 8, generator=rng), tokens)
    seen = []
    m.register_forward_hook(lambda mod, args, kwargs, out: seen.append((args[0].shape, set(kwargs))), with_kwargs=True)
    trajectory_runner(m, c, (32, 2, 8, 8), steps=2, seed=0, n_traj=1)(0, lambda step: None)
    assert [s for s, _ in seen] == [(1, 65, 2, 8, 8)] * 2 and all({"txt_byt5", "clip_fea"} <= k for _, k in seen)
    out = tmp_path / "v15.safetensors"
    compress_streaming(StateDictSource(sd), c, (32, 2, 8, 8), out, CalibSettings(method="msad", epochs=1, stride=16,
                       top_k=16), n_samples=2, steps=3, seed=0)
    model, header = load_compressed(out)
    assert model.config.variant == "HunyuanVideo 1.5" and len(header["calibration"]["final_losses"]) == 2
    other = Conditioning(c.context, None, None, 6.0, c.concat, {"txt_byt5": tokens["txt_byt5"]})
    assert job_data(c, (32, 2, 8, 8), 2, 3, 0)["prompt"] != job_data(other, (32, 2, 8, 8), 2, 3, 0)["prompt"]

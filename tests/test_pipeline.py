"""The Calibrate node's job without ComfyUI: capture from a given prompt, calibrate, save; resume."""
import pytest
import torch
from safetensors.torch import load_file

from quantsparse_core.calib.calibrate import CalibSettings
from quantsparse_core.calib.pipeline import Conditioning, compress, dit_from_state_dict, state_dict_hash
from quantsparse_core.io.checkpoint import load_compressed
from quantsparse_core.models.config import PRESETS
from quantsparse_core.models.hunyuan_video import HunyuanVideoDiT

LATENT = (16, 2, 4, 6)  # grid 2 x 2 x 3 = 12 video tokens


def _job(rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    sd = {k: v.clone() for k, v in HunyuanVideoDiT(PRESETS["test"]).state_dict().items()}
    cfg = PRESETS["test"]
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    cond = Conditioning(torch.randn(1, 6, cfg.context_in_dim, generator=rng), torch.randn(1, 768, generator=rng),
                        mask, guidance=6.0)
    return sd, cond


def test_compress_writes_a_loadable_checkpoint_and_resumes_identically(rng, tmp_path):
    sd, cond = _job(rng)
    settings = CalibSettings(method="block", epochs=2)
    kw = dict(n_samples=3, steps=4, seed=7)
    out_a = tmp_path / "a" / "model.safetensors"
    compress(sd, cond, LATENT, out_a, settings, **kw)

    out_b = tmp_path / "b" / "model.safetensors"
    calls = []

    def stop_in_second_block(block, n_blocks, epoch, loss):
        calls.append(block)
        if block == 1:
            raise KeyboardInterrupt("user pressed cancel")

    with pytest.raises(KeyboardInterrupt):
        compress(sd, cond, LATENT, out_b, settings, progress=stop_in_second_block, **kw)
    assert not out_b.exists()                                   # nothing half-written
    partial = list((out_b.parent / ".quantsparse-partial").iterdir())
    assert len(partial) == 1 and (partial[0] / "double_blocks.0.safetensors").exists()

    seen = []
    compress(sd, cond, LATENT, out_b, settings, progress=lambda b, n, e, l: seen.append(b), **kw)
    assert 0 not in seen and 1 in seen                          # block 0 was not redone
    assert not (out_b.parent / ".quantsparse-partial").exists()
    a, b = load_file(str(out_a)), load_file(str(out_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, header = load_compressed(out_a)
    assert header["source_hash"] == state_dict_hash(sd)
    assert header["calibration"]["data"]["n_samples"] == 3
    x = torch.randn(1, *LATENT, generator=rng)
    t = torch.tensor([500.0])
    fp = dit_from_state_dict(sd)
    with torch.no_grad():
        ref = fp(x, t, cond.context, cond.pooled, guidance=torch.tensor([6.0]), attention_mask=cond.mask)
        got = model(x, t, cond.context, cond.pooled, guidance=torch.tensor([6.0]), attention_mask=cond.mask)
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.2, rel                                   # W4A8 on random weights: close, not equal


def test_compress_refuses_bad_settings_before_work(rng, tmp_path):
    sd, cond = _job(rng)
    with pytest.raises(ValueError, match="safetensors"):
        compress(sd, cond, LATENT, tmp_path / "model.ckpt", CalibSettings(method="rtn"))
    with pytest.raises(ValueError, match="channels"):
        compress(sd, cond, (4, 2, 4, 6), tmp_path / "m.safetensors", CalibSettings(method="rtn"))
    bad = {k: v for k, v in sd.items() if not k.startswith("txt_in")}
    with pytest.raises(ValueError):
        compress(bad, cond, LATENT, tmp_path / "m.safetensors", CalibSettings(method="rtn"))
    assert not any(tmp_path.iterdir())


def test_not_enough_vram_is_refused_before_any_work(rng, tmp_path, monkeypatch):
    from quantsparse_core.calib import pipeline
    sd, cond = _job(rng)
    params = sum(t.numel() for t in sd.values())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (params * 4, 80 * 2**30))  # < 1.25 x fp32
    with pytest.raises(MemoryError, match="GB are free"):
        pipeline.compress(sd, cond, LATENT, tmp_path / "m.safetensors", CalibSettings(method="rtn"), device="cuda")
    assert not any(tmp_path.iterdir())

"""The tiny Wan's pieces on the CPU (its weights are trained on a GPU: train.py --family wan): the prompt
tokens padded into Wan's 4096-wide text input, a few training steps that lower the loss and write a file
load_wan reads back exactly, and generation through Wan's sampler."""
import pytest
import torch
from safetensors.torch import load_file

from quantsparse_core.models.tiny import train
from quantsparse_core.models.tiny.embedded import generate_wan, load_wan
from quantsparse_core.models.tiny.prompts import PromptEncoder
from quantsparse_core.models.wan import WanDiT, get_wan_preset


def test_wan_prompt_tokens_are_the_tiny_tokens_zero_padded():
    prompts = ["a red circle moving right slowly on a black background", ""]
    ctx, mask, _ = PromptEncoder().encode(prompts)
    wan = PromptEncoder().encode_wan(prompts)
    assert wan.shape == (2, 24, 4096)
    assert torch.equal(wan[..., :64], ctx) and not wan[..., 64:].any()
    assert not wan[1].any() and mask[1].sum() == 0  # the empty prompt: all padding
    with pytest.raises(ValueError, match="narrower"):
        PromptEncoder().encode_wan(prompts, text_dim=32)


def test_tiny_wan_preset_loads_in_comfyuis_shapes_and_is_small():
    c = get_wan_preset("tiny-wan")
    assert c.head_dim == 128 and c.text_dim == 4096 and c.comfy_model == "WAN21_T2V"
    params = sum(p.numel() for p in WanDiT(c, device="meta").parameters())
    assert 4e6 < params < 10e6  # ~2x smaller than the tiny HunyuanVideo's 9.5M (bf16: under 20 MB)


def test_a_few_training_steps_write_a_file_load_wan_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "FRAMES", 2)  # 2 frames of 64 x 64: a small latent for a CPU test
    monkeypatch.setattr(train, "SIZE", 64)
    out = tmp_path / "tiny_wan.safetensors"
    assert train.main(["--family", "wan", "--steps", "3", "--batch", "2", "--device", "cpu", "--out", str(out)]) == 0
    model, meta = load_wan(out)
    assert meta["format"] == "quantsparse-tiny-wan" and meta["steps"] == 3 and "--family wan" in meta["command"]
    assert meta["config"]["num_layers"] == 4
    sd = load_file(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k].float()), k
    video = generate_wan(model, ["a blue square moving left slowly on a white background"], [0], steps=2,
                         latent_shape=(16, 2, 16, 16))
    assert video.latents.shape == (1, 16, 2, 16, 16) and torch.isfinite(video.videos).all()
    with pytest.raises(FileNotFoundError, match="--family wan"):
        load_wan(tmp_path / "missing.safetensors")


def test_compile_flag_trains_through_the_compiled_model(tmp_path, monkeypatch):
    """--compile: every training forward goes through torch.compile's module (here a recording stand-in that runs
    the model as it is), which shares the model's parameters, so the EMA weights written equal an eager run's."""
    monkeypatch.setattr(train, "FRAMES", 2)
    monkeypatch.setattr(train, "SIZE", 64)
    compiled, calls = [], []

    def fake_compile(module):
        compiled.append(module)
        return lambda *a, **k: calls.append(1) or module(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = ["--family", "wan", "--steps", "2", "--batch", "2", "--device", "cpu", "--seed", "4"]
    assert train.main(args + ["--compile", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], WanDiT) and len(calls) == 2
    assert train.main(args + ["--out", str(tmp_path / "e.safetensors")]) == 0
    assert len(calls) == 2
    got, want = load_file(str(tmp_path / "c.safetensors")), load_file(str(tmp_path / "e.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_conditioning_dropout_replaces_prompts_by_the_empty_one(rng):
    """drop_prompts keeps a prompt exactly where its uniform draw is >= p (the same draws, read back here from a
    copy of the generator); p = 0 keeps all; the empty prompt encodes as all padding."""
    prompts = [f"p{i}" for i in range(400)]
    state = rng.get_state()
    out = train.drop_prompts(prompts, 0.25, rng)
    draws = torch.rand(400, generator=torch.Generator().set_state(state))
    assert out == [t if d >= 0.25 else "" for t, d in zip(prompts, draws.tolist())]
    assert 0.15 < out.count("") / 400 < 0.35
    assert train.drop_prompts(prompts, 0.0, rng) == prompts
    with pytest.raises(ValueError, match="cond-dropout"):
        train.drop_prompts(prompts, 1.0, rng)
    ctx, mask, pooled = PromptEncoder().encode(["", "a red circle moving right slowly on a black background"])
    assert mask[0].sum() == 0 and pooled[0].abs().sum() == 0 and mask[1].sum() == 10


def test_training_loss_readout_is_the_mean_of_the_last_steps(rng):
    """The trainer keeps per-step losses in one fixed device buffer and reads back the mean of the last 200."""
    from quantsparse_core.models.tiny.train import LossWindow
    values = torch.rand(350, generator=rng, dtype=torch.float64) * 3
    window = LossWindow(torch.device("cpu"))
    for i, v in enumerate(values):
        window.add(v.float())
        if i == 6:
            assert abs(window.mean() - float(values.float().double()[:7].mean())) < 1e-6
    assert abs(window.mean() - float(values.float().double()[-200:].mean())) < 1e-6
    assert window.values.numel() == 200

"""The embedded tiny model: shipped weights are sane, it has learned its task, its attention is structured."""
import json

import pytest
import torch

from quantsparse_core.models import get_preset
from quantsparse_core.models.tiny.attention_report import attention_shares
from quantsparse_core.models.tiny.embedded import LATENT_SHAPE, WEIGHTS, load_embedded, trained_for_cfg
from quantsparse_core.models.tiny.evaluate import FIXED_SCENES, prompt_agreement

_MODEL = {}


def model():
    if not _MODEL:
        _MODEL["m"], _MODEL["meta"] = load_embedded()
    return _MODEL["m"], _MODEL["meta"]


def test_weights_file_is_small_and_describes_itself():
    assert WEIGHTS.stat().st_size <= 32 * 2 ** 20
    m, meta = model()
    assert m.config == get_preset("tiny")
    assert m.config.head_dim == 128 and m.config.num_heads >= 2
    _, t, h, w = LATENT_SHAPE
    assert t * (h // 2) * (w // 2) >= 2048  # at least 16 blocks of 128 video tokens
    # The training loss averages prompted and empty-prompt samples; the unconditional velocity is harder to
    # predict, so a run with --cond-dropout ends higher (2026-12-07 CPU fine-tune at 0.3: ~0.1).
    bound = 0.15 if trained_for_cfg(meta) else 0.05
    assert meta["format"] == "quantsparse-tiny-dit" and 0 < float(meta["final_loss"]) < bound
    assert "train" in meta["command"]  # the command that made the file (recorded in its header)


def test_generated_videos_match_their_prompts():
    """The analyser reads the prompt's color and motion direction back from >= 80% of videos."""
    m, _ = model()
    score, rows = prompt_agreement(m, FIXED_SCENES, steps=16)
    report = "\n".join(f"{'ok ' if ok else 'BAD'} {s.prompt()} -> {f}" for s, f, ok in rows)
    assert score >= 0.8, f"agreement {score:.0%} < 80%:\n{report}"


def test_guided_videos_match_their_prompts():
    """cfg > 1 (classifier-free guidance against the empty prompt, as ComfyUI applies it) keeps >= 80%
    agreement: the weights learned the unconditional input (--cond-dropout). Weights without it: 40% at
    cfg 2.5, the misses saturated black or white frames (2026-12-07)."""
    m, meta = model()
    if not trained_for_cfg(meta):
        pytest.skip("the shipped tiny weights were trained without --cond-dropout (README): cfg 1 only")
    videos = []
    score, rows = prompt_agreement(m, FIXED_SCENES, steps=16, cfg=2.5, keep=videos)
    report = "\n".join(f"{'ok ' if ok else 'BAD'} {s.prompt()} -> {f} mean {float(v.mean()):.2f}"
                       for (s, f, ok), v in zip(rows, videos))
    assert score >= 0.8, f"agreement at cfg 2.5 {score:.0%} < 80%:\n{report}"


def test_guidance_combines_prompt_and_empty_prompt_velocities(rng):
    """ClassifierFreeGuidance = v(empty) + cfg (v(prompt) - v(empty)), each from its own model call."""
    from quantsparse_core.models.tiny.embedded import ClassifierFreeGuidance
    from quantsparse_core.models.tiny.prompts import PromptEncoder

    m, _ = model()
    ctx, mask, pooled = PromptEncoder().encode([FIXED_SCENES[0].prompt(), FIXED_SCENES[1].prompt()])
    x = torch.randn(2, *LATENT_SHAPE, generator=rng)
    t, g, cfg = torch.full((2,), 700.0), torch.full((2,), 6.0), 1.5 + float(torch.rand((), generator=rng))
    empty = PromptEncoder().encode(["", ""])
    with torch.no_grad():
        got = ClassifierFreeGuidance(m, cfg, 2, x)(x, t, ctx, pooled, attention_mask=mask, guidance=g)
        v_c = m(x, t, ctx, pooled, guidance=g, attention_mask=mask).double()
        v_u = m(x, t, empty[0], empty[2], guidance=g, attention_mask=empty[1]).double()
    want = v_u + cfg * (v_c - v_u)
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-5 * float(want.abs().max())), \
        float((got.double() - want).abs().max())
    assert (v_c - v_u).abs().max() > 1e-3  # the prompt matters, so the check is not vacuous


def test_attention_is_local_in_space_and_along_time(rng):
    """Video queries put far more mass on their own frame and on their own position in other
    frames than uniform attention would (probed mid-trajectory on a real noisy latent)."""
    from quantsparse_core.models.attention import StepInfo, dense_attention
    from quantsparse_core.models.tiny.prompts import PromptEncoder
    from quantsparse_core.models.sampler import flow_sigmas

    m, _ = model()
    ctx, mask, pooled = PromptEncoder().encode([FIXED_SCENES[0].prompt()])
    sigmas = flow_sigmas(16)
    x = torch.randn(1, *LATENT_SHAPE, generator=rng) * sigmas[8]
    shares = []

    def spy(q, k, v, msk, call):
        if call.block_type != "refiner":
            shares.append(attention_shares(q, k, msk, call.txt_len, call.grid))
        return dense_attention(q, k, v, msk, call)

    with torch.no_grad(), m.attention(spy):
        m(x, torch.tensor([float(sigmas[8]) * 1000]), ctx, pooled, torch.tensor([6.0]), attention_mask=mask,
          step=StepInfo(8, sigmas))
    best_frame = max(max(h) / base for s in shares for h, base in [s["same frame"]])
    best_time = max(max(h) / base for s in shares for h, base in [s["same position, other frames"]])
    assert best_frame > 2.0, json.dumps(shares)
    assert best_time > 2.0, json.dumps(shares)

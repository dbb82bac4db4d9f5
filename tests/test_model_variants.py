"""Our DiT on every HunyuanVideo variant it covers, without ComfyUI (tests/test_comfy_variants.py compares
with ComfyUI itself): every preset builds and runs on the meta device and reads back from its own keys;
the small presets agree with a float64 run of themselves; the joint sequence is laid out as documented
([vision, byT5, text | reference | video]) with the text mask on the text tokens only; bad inputs are refused
with messages that say what to do.
"""
import dataclasses

import pytest
import torch

from quantsparse_core.models import PRESETS, DiTConfig, HunyuanVideoDiT, config_from_state_dict, dense_attention, \
    get_preset
from quantsparse_core.models.hunyuan_video import RefAttentionCall

VARIANTS = {"hunyuan-video-13b": "HunyuanVideo 1.0 T2V", "tiny": "HunyuanVideo 1.0 T2V",
            "test": "HunyuanVideo 1.0 T2V", "hunyuan-video-i2v-13b": "HunyuanVideo 1.0 I2V",
            "test-i2v": "HunyuanVideo 1.0 I2V", "hunyuan-video-1.5-8b": "HunyuanVideo 1.5", "test-1.5": "HunyuanVideo 1.5"}


def inputs(cfg: DiTConfig, rng=None, device="cpu", b=2, frames=2, rows=3, cols=2, ref=True, n_txt=6, n_byt5=3,
           n_vision=4):
    """Latent, timestep, text and every extra input this config takes (random, or empty on the meta device)."""
    def make(*shape):
        return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=rng)
    p = cfg.patch_size[1]
    kw = dict(x=make(b, cfg.in_channels, frames, rows * p, cols * p), timestep=torch.tensor([800.0, 90.0])[:b],
              context=make(b, n_txt, cfg.context_in_dim))
    if device == "meta":
        kw["timestep"] = kw["timestep"].to("meta")
    if cfg.vec_in_dim:
        kw["y"] = make(b, cfg.vec_in_dim)
    if cfg.guidance_embed:
        kw["guidance"] = kw["timestep"] / 100
    if ref:
        kw["ref_latent"] = make(b, cfg.in_channels, 1, rows * p, cols * p)
    if cfg.byt5_in_dim and n_byt5:
        kw["txt_byt5"] = make(b, n_byt5, cfg.byt5_in_dim)
    if cfg.vision_in_dim and n_vision:
        kw["clip_fea"] = make(b, n_vision, cfg.vision_in_dim)
    return kw


def random_model(preset_or_config, rng, dtype=torch.float32):
    cfg = get_preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    m = HunyuanVideoDiT(cfg, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    return m.eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_runs_and_reads_back_on_meta(name):
    """The storage/speed tools build models on the meta device: every preset must, and run a forward there."""
    cfg = get_preset(name)
    assert cfg.variant == VARIANTS[name]
    model = HunyuanVideoDiT(cfg, device="meta")
    assert config_from_state_dict(model.state_dict()) == cfg
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    kw = inputs(cfg, device="meta", frames=3, rows=2, cols=5)
    out = model(**kw)
    p = cfg.patch_size[1]
    assert out.device.type == "meta" and tuple(out.shape) == (2, cfg.out_channels, 3, 2 * p, 5 * p)


def test_v10_config_dicts_keep_their_fields():
    """Checkpoint headers store DiTConfig.to_dict(), and older readers reject unknown fields: a 1.0 dict keeps
    exactly the fields it had before 1.5 existed; a 1.5 dict carries its own and reads back."""
    v10 = {"hidden_size", "num_heads", "depth_double", "depth_single", "mlp_ratio", "in_channels", "out_channels",
           "patch_size", "context_in_dim", "vec_in_dim", "guidance_embed", "rope_axes", "rope_theta", "refiner_blocks"}
    for name in ("hunyuan-video-13b", "tiny", "test", "hunyuan-video-i2v-13b", "test-i2v"):
        assert set(get_preset(name).to_dict()) == v10
    d = get_preset("test-1.5").to_dict()
    assert set(d) - v10 == {"byt5_in_dim", "vision_in_dim", "cond_type_embedding"}
    assert DiTConfig.from_dict(d) == get_preset("test-1.5")
    meanflow = dataclasses.replace(get_preset("test"), meanflow=True)
    assert DiTConfig.from_dict(meanflow.to_dict()) == meanflow


def test_v15_preset_is_the_8b_model_and_i2v_differs_from_t2v_only_at_the_input():
    """HunyuanVideo 1.5 is published as 8.3B parameters, 1.0 as 13B (12.8B in the transformer); 1.0 I2V is
    the 13B model with 33 input channels and no guidance embedding."""
    models = {n: HunyuanVideoDiT(get_preset(n), device="meta")
              for n in ("hunyuan-video-1.5-8b", "hunyuan-video-13b", "hunyuan-video-i2v-13b")}
    counts = {n: sum(p.numel() for p in m.parameters()) / 1e9 for n, m in models.items()}
    assert 8.25 < counts["hunyuan-video-1.5-8b"] < 8.35 and 12.7 < counts["hunyuan-video-13b"] < 12.9
    t2v, i2v = (models[n].state_dict() for n in ("hunyuan-video-13b", "hunyuan-video-i2v-13b"))
    assert set(t2v) - set(i2v) == {k for k in t2v if k.startswith("guidance_in.")} and set(i2v) <= set(t2v)
    assert [k for k in i2v if i2v[k].shape != t2v[k].shape] == ["img_in.proj.weight"]
    assert i2v["img_in.proj.weight"].shape == (3072, 33, 1, 2, 2)


@pytest.mark.parametrize("name", ["test-i2v", "test-1.5"])
def test_small_presets_agree_with_float64(rng, name):
    """All inputs at once (reference latent, byT5 and image tokens, text mask), float32 against float64."""
    cfg = get_preset(name)
    m32 = random_model(cfg, rng)
    m64 = HunyuanVideoDiT(cfg, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    kw = inputs(cfg, rng, b=1, frames=3, rows=3, cols=5)
    mask = torch.ones(1, kw["context"].shape[1], dtype=torch.long)
    mask[0, -2:] = 0
    with torch.no_grad():
        a = m32(**kw, attention_mask=mask)
        ref = m64(**{k: v.double() if v.is_floating_point() else v for k, v in kw.items()}, attention_mask=mask)
    rel = ((a.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(a).all() and rel < 1e-5, f"{name}: float32 vs float64 relative error {rel:.2e}"


def _recorded_calls(model, **kw):
    seen = []

    def record(q, k, v, mask, call):
        seen.append((q.shape[2], None if mask is None else mask.clone(), call))
        return dense_attention(q, k, v, mask, call)

    with torch.no_grad(), model.attention(record):
        model(**kw)
    return seen


def test_joint_sequence_layout_and_text_mask(rng):
    """1.5 with a reference latent: the text part is image + byT5 + text tokens, reference tokens follow it, and
    only the padded text tokens are blocked (never byT5, image, reference or video tokens)."""
    cfg = get_preset("test-1.5")
    model = random_model(cfg, rng)
    kw = inputs(cfg, rng, b=1, frames=2, rows=3, cols=4, n_txt=6, n_byt5=3, n_vision=4)
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[0, 4:] = 0
    calls = _recorded_calls(model, **kw, attention_mask=mask)
    refiner = [c for c in calls if c[2].block_type == "refiner"]
    joint = [c for c in calls if c[2].block_type != "refiner"]
    assert len(refiner) == cfg.refiner_blocks and len(joint) == cfg.depth_double + cfg.depth_single
    assert all(length == 6 and call.txt_len == 6 for length, _, call in refiner)
    grid, ref_tokens = (2, 3, 4), 1 * 3 * 4
    for length, m, call in joint:
        assert isinstance(call, RefAttentionCall) and call.grid == grid
        assert (call.txt_len, call.ref_len) == (4 + 3 + 6, ref_tokens)
        assert length == call.txt_len + call.ref_len + call.video_len
        blocked = (m[0, 0] < -1e3).nonzero().flatten().tolist()
        assert blocked == [4 + 3 + 4, 4 + 3 + 5], blocked  # the two padded text tokens, after image + byT5


def test_without_reference_latent_calls_stay_plain_attention_calls(rng):
    """1.0 T2V and reference-free calls keep the plain AttentionCall (what the sparse patch and fused path know)."""
    model = random_model("test", rng)
    calls = _recorded_calls(model, **inputs(model.config, rng, ref=False))
    assert calls and all(type(call).__name__ == "AttentionCall" for _, _, call in calls)
    assert all(length == call.txt_len + call.video_len for length, _, call in calls if call.block_type != "refiner")


@pytest.mark.parametrize("which", ["txt_byt5", "clip_fea"])
def test_extra_text_part_tokens_are_unordered(rng, which):
    """byT5 and image tokens all sit at RoPE position 0 and are never masked, so the video output cannot depend
    on their order; a position or mask given to them by mistake would break this."""
    cfg = get_preset("test-1.5")
    model = random_model(cfg, rng)
    kw = inputs(cfg, rng, b=1, ref=False, n_byt5=5, n_vision=5)
    perm = torch.randperm(5, generator=rng)
    shuffled = dict(kw, **{which: kw[which][:, perm]})
    with torch.no_grad():
        a, b = model(**kw), model(**shuffled)
        dropped = model(**{k: v for k, v in kw.items() if k != which})
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ((a - dropped).norm() / a.norm()).item() > 1e-3, f"{which} had no effect on the output"


def test_reference_tokens_follow_their_positions(rng):
    """Reference tokens carry positions (frame -1, shifted columns): moving the reference image changes the
    output, and the output keeps the latent's own shape whatever the reference's size."""
    cfg = get_preset("test-i2v")
    model = random_model(cfg, rng)
    kw = inputs(cfg, rng, b=1, frames=2, rows=2, cols=3)
    ref_other = torch.randn(1, cfg.in_channels, 3, 4, 8, generator=rng)
    with torch.no_grad():
        a = model(**kw)
        flipped = model(**dict(kw, ref_latent=kw["ref_latent"].flip(-1)))
        other = model(**dict(kw, ref_latent=ref_other))
    assert other.shape == a.shape == (1, cfg.out_channels, 2, 4, 6)
    assert ((a - flipped).norm() / a.norm()).item() > 1e-4


def test_bad_inputs_are_refused_with_a_fix(rng):
    i2v, v15, t2v = (HunyuanVideoDiT(get_preset(n), device="meta") for n in ("test-i2v", "test-1.5", "test"))
    kw = inputs(i2v.config, device="meta", ref=False)
    with pytest.raises(ValueError, match=r"latent has 16 channels; this model takes 33 \(an image-to-video model: "
                                         r"concatenate the image latent"):
        i2v(**dict(kw, x=torch.empty(2, 16, 2, 6, 4, device="meta")))
    with pytest.raises(ValueError, match="ref_latent has 16 channels; this model takes 33"):
        i2v(**kw, ref_latent=torch.empty(2, 16, 1, 6, 4, device="meta"))
    with pytest.raises(ValueError, match="ref_latent has batch 1; the latent has batch 2"):
        i2v(**kw, ref_latent=torch.empty(1, 33, 1, 6, 4, device="meta"))
    with pytest.raises(ValueError, match="txt_byt5 / clip_fea are HunyuanVideo 1.5 inputs"):
        t2v(**inputs(t2v.config, device="meta", ref=False), txt_byt5=torch.empty(2, 3, 1472, device="meta"))
    kw15 = inputs(v15.config, device="meta", ref=False, n_byt5=0, n_vision=0)
    with pytest.raises(ValueError, match=r"clip_fea must be \[batch 2, tokens, 1152\], got \(2, 4, 768\)"):
        v15(**kw15, clip_fea=torch.empty(2, 4, 768, device="meta"))
    with pytest.raises(ValueError, match=r"txt_byt5 must be \[batch 2, tokens, 1472\]"):
        v15(**kw15, txt_byt5=torch.empty(1, 3, 1472, device="meta"))
    with pytest.raises(ValueError, match="without cond_type_embedding are not a HunyuanVideo 1.5"):
        dataclasses.replace(get_preset("test-1.5"), cond_type_embedding=False)


def test_calibration_refuses_variants_it_cannot_condition():
    """Calibration captures text, image channels (Conditioning.concat) and 1.5's byT5 / image tokens
    (Conditioning.tokens), not a distilled 1.5 model's second timestep: that one is refused up front (in-memory
    and streaming paths), naming it and what to do instead; 1.0 T2V, 1.0 I2V and 1.5 are accepted."""
    from quantsparse_core.calib.block_source import StateDictSource
    from quantsparse_core.calib.pipeline import dit_from_state_dict
    torch.manual_seed(0)
    sd = HunyuanVideoDiT(dataclasses.replace(get_preset("test-1.5"), meanflow=True)).state_dict()
    for build in (dit_from_state_dict, StateDictSource):
        with pytest.raises(ValueError, match=r"HunyuanVideo 1\.5 \(meanflow-distilled\).*round-to-nearest"):
            build(sd)
    for ok in ("test", "test-i2v", "test-1.5"):
        assert StateDictSource(HunyuanVideoDiT(get_preset(ok)).state_dict()).config == get_preset(ok)

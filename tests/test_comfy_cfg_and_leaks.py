"""Issue 21, as a new user meets it in ComfyUI 0.29: cfg > 1 with a negative prompt, batch-2 latents, the
empty prompt, non-finite outputs, and state left behind by one sampling run for the next.

Everything samples through ComfyUI's own `comfy.sample.sample` (what KSampler runs) with the embedded tiny
model, and compares with quantsparse_core's HunyuanVideo DiT (same weights, per-batch text masks) on fresh
random noise. Measured on a 2-core CPU: the ComfyUI and core velocities agree to ~3e-7 relative (fp32);
the stated tolerance is 1e-5.
"""
import pytest
import torch

from comfy_env import require_comfyui
from test_comfy_nodes import load_pack

POS = "a red circle moving right slowly on a black background"   # 10 words
NEG = "a blue square moving"                                       # 4 words: other padding
LATENT = dict(width=64, height=64, length=5)                       # latent 16 x 2 x 8 x 8: fast
SPARSE_LATENT = dict(width=192, height=192, length=9)              # 16 x 3 x 24 x 24: 432 video tokens
SPARSE = dict(density=0.3, refresh_interval=2, svd_rank=4, warmup_steps=1, warmup_blocks=1,
              cache_placement="auto")
STEPS = 3
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These shapes are tiny: with 2 threads every op waits for the second core, ~7 ms per op when another
    process is busy on it (3 steps: 2.7 s against 0.08 s on one thread, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def env(one_thread):
    require_comfyui()
    from quantsparse_core.models.tiny.embedded import load_embedded
    nodes = load_pack()
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    core, _ = load_embedded()
    return nodes, model, core


def _latent(batch=1, **kw):
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
    return EmptyHunyuanLatentVideo.execute(batch_size=batch, **(kw or LATENT)).result[0]["samples"]


def _encode(nodes, text):
    return nodes["QuantSparseTinyPromptEncode"].execute(text).result[0]


def _sample(model, noise, cfg, positive, negative, callback=None, steps=STEPS):
    """ComfyUI's KSampler path; the latent in the core's units (ComfyUI divides by the latent scale)."""
    import comfy.latent_formats
    import comfy.sample
    with torch.inference_mode():  # as ComfyUI runs every node
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative,
                                  torch.zeros_like(noise), callback=callback, disable_pbar=True)
    return out * comfy.latent_formats.HunyuanVideo().scale_factor


def _sigmas(model, steps=STEPS):
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float()


def _core_cfg(core, noise, sigmas, pos, neg, cfg, attention=None):
    """Euler with classifier-free guidance in the core; pos/neg: (context, mask, pooled) of batch 1;
    attention: {"pos": fn, "neg": fn} to run each prompt with its own attention function (None: dense)."""
    import contextlib
    from quantsparse_core.models.attention import StepInfo
    b = noise.shape[0]
    x = noise * sigmas[0]
    g = torch.full((b,), 6.0)

    def velocity(name, c, t, step):
        ctx, mask, pooled = c
        with core.attention(attention[name]) if attention else contextlib.nullcontext():
            return core(x, t, ctx.expand(b, -1, -1), pooled.expand(b, -1), guidance=g,
                        attention_mask=mask.expand(b, -1), step=step)

    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            t, step = torch.full((b,), s * 1000.0), StepInfo(i, sigmas)
            v = velocity("pos", pos, t, step)
            if cfg != 1.0:
                u = velocity("neg", neg, t, step)
                v = u + cfg * (v - u)
            x = x + (s_next - s) * v
    return x


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _cond_tuple(cond):
    (ctx, extra), = cond
    return ctx, extra["attention_mask"], extra["pooled_output"]


# ---- 1. cfg > 1 with a negative prompt of another length; a batch-2 latent ------------------------------------
@pytest.mark.parametrize("cfg,batch", [(2.0, 1), (1.0, 2), (2.0, 2)])
def test_cfg_and_batches_with_differently_padded_prompts_equal_the_core(env, rng, cfg, batch):
    nodes, model, core = env
    pos, neg = _encode(nodes, POS), _encode(nodes, NEG)
    noise = torch.randn(_latent(batch).shape, generator=rng)
    got = _sample(model, noise, cfg, pos, neg)   # was: RuntimeError "expanded size ... Target sizes: [1, 24]"
    ref = _core_cfg(core, noise, _sigmas(model), _cond_tuple(pos), _cond_tuple(neg), cfg)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < TOL, _rel(got, ref)


# ---- 2. the empty prompt: finite, and the text really is absent ----------------------------------------------
def test_empty_prompt_gives_a_finite_latent_independent_of_the_text(env, rng):
    nodes, model, core = env
    empty = _encode(nodes, "")
    ctx, mask, pooled = _cond_tuple(empty)
    assert mask.sum() == 0 and pooled.abs().max() == 0
    noise = torch.randn(_latent().shape, generator=rng)
    got = _sample(model, noise, 1.0, empty, empty)   # was: an all-NaN latent, reported as a success
    assert torch.isfinite(got).all()
    # Every text token is masked: the video must not depend on the context at all (random tokens, same mask).
    other = [[torch.randn(ctx.shape, generator=rng), {"pooled_output": pooled, "attention_mask": mask}]]
    torch.testing.assert_close(_sample(model, noise, 1.0, other, other), got, rtol=0, atol=1e-6)
    # ...and equals the core given the same integer mask (the core's floor is finite too: it gave NaN before).
    ref = _core_cfg(core, noise, _sigmas(model), (ctx, mask, pooled), None, 1.0)
    assert _rel(got, ref) < TOL, _rel(got, ref)
    # cfg > 1 against the empty (unconditional) prompt runs and is finite too.
    assert torch.isfinite(_sample(model, noise, 2.0, _encode(nodes, POS), empty)).all()


def test_cfg_above_one_makes_videos_that_match_their_prompts(env):
    """What a user sees at cfg 2.5 with an empty negative prompt (KSampler, 16 steps, the tiny model's own
    frame size, decoded by Tiny Decode): the prompt's color and motion, not saturated frames (the weights
    shipped before 2026-12-07 never saw the empty prompt: 40% of the fixed set at cfg 2.5, frames black or
    white). Needs weights trained with --cond-dropout."""
    import comfy.latent_formats

    from quantsparse_core.models.tiny.embedded import load_embedded, trained_for_cfg
    from quantsparse_core.models.tiny.evaluate import FIXED_SCENES
    from quantsparse_core.models.tiny.shapes import agrees

    if not trained_for_cfg(load_embedded()[1]):
        pytest.skip("the shipped tiny weights were trained without --cond-dropout (README): cfg 1 only")
    nodes, model, _ = env
    empty, scenes, ok = _encode(nodes, ""), FIXED_SCENES[:5], []
    for i, scene in enumerate(scenes):
        noise = torch.randn(_latent(width=256, height=256, length=29).shape,
                            generator=torch.Generator().manual_seed(100 + i))
        threads = torch.get_num_threads()
        torch.set_num_threads(2)   # 2,048 video tokens: large enough for both cores
        try:
            got = _sample(model, noise, 2.5, _encode(nodes, scene.prompt()), empty, steps=16)
        finally:
            torch.set_num_threads(threads)
        (frames,) = nodes["QuantSparseTinyDecode"].execute(
            {"samples": got / comfy.latent_formats.HunyuanVideo().scale_factor}).result    # [F, H, W, 3]
        video = frames.permute(3, 0, 1, 2)                       # [3, F, H, W], as the analyser reads it
        ok.append(agrees(video, scene))
    assert sum(ok) >= 4, [(s.prompt(), k) for s, k in zip(scenes, ok)]


def _nan_conditioning(nodes):
    (ctx, extra), = _encode(nodes, POS)
    return [[ctx, {**extra, "pooled_output": torch.full_like(extra["pooled_output"], float("nan"))}]]


def test_non_finite_output_stops_the_run_with_its_cause(env, rng):
    nodes, model, _ = env
    bad = _nan_conditioning(nodes)
    latent = {"samples": _latent(**SPARSE_LATENT)}
    with pytest.raises(ValueError, match=r"step 1 of 3.*NaN") as err:   # was: a silent all-NaN latent
        with torch.inference_mode():
            nodes["QuantSparseSparseSampler"].execute(
                model=model, seed=int(torch.randint(0, 2**31, (1,), generator=rng)), steps=STEPS, cfg=1.0,
                sampler_name="euler", scheduler="simple", positive=bad, negative=bad, latent_image=latent,
                denoise=1.0, **SPARSE)
    assert "conditioning" in str(err.value)  # the message says what to check
    # The embedded model's own MODEL (any sampler) stops the same way.
    with pytest.raises(ValueError, match=r"step 1 of 3.*NaN"):
        _sample(model, torch.randn(_latent().shape, generator=rng), 1.0, bad, bad)


# ---- 3. nothing leaks from one run into the next ---------------------------------------------------------------
def _patched(nodes, model):
    (patched,) = nodes["QuantSparseSparseAttention"].execute(model=model, **SPARSE).result
    return patched


def _attention_recorder(monkeypatch):
    """Every SSARAttention the sparse runs create, to inspect after the run."""
    import sys
    patch_mod = next(m for n, m in sys.modules.items() if n.endswith("nodes.sparse_patch") and hasattr(m, "SparseRun"))
    made = []
    original = patch_mod.SparseRun.attention_for

    def attention_for(self, group):
        a = original(self, group)
        if all(a is not b for b in made):
            made.append(a)
        return a

    monkeypatch.setattr(patch_mod.SparseRun, "attention_for", attention_for)
    return made


def test_interrupt_during_sparse_sampling_drops_the_run_state(env, rng, monkeypatch):
    import comfy.model_management as mm
    nodes, model, _ = env
    pos = _encode(nodes, POS)
    noise = torch.randn(_latent(**SPARSE_LATENT).shape, generator=rng)
    dense_before = _sample(model, noise, 1.0, pos, pos)
    patched = _patched(nodes, model)
    made = _attention_recorder(monkeypatch)
    seen = {}

    def interrupt_after_step_1(step, x0, x, total):
        if step == 1:  # step 0 is the dense warm-up, step 1 the first refresh (masks + residual caches)
            seen.update(refresh=sum(a.stats["refresh"] for a in made), stores=sum(a._store is not None for a in made))
            mm.interrupt_current_processing(True)   # what the UI's Cancel does; ComfyUI's ops raise next

    try:
        with pytest.raises(mm.InterruptProcessingException) as err:
            _sample(patched, noise, 1.0, pos, pos, callback=interrupt_after_step_1, steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert err.value is not None  # the exception (and its traceback, as ComfyUI keeps it) is still alive here
    assert seen["refresh"] > 0 and seen["stores"] > 0, f"the sparse path did not run before the interrupt: {seen}"
    for a in made:  # was: the run's masks and residual caches stayed referenced after the interrupt
        assert a._store is None and not a._states and not a._pending, "SSAR state survived the interrupt"
    # A dense run afterwards is bit-identical to the one before; a sparse run equals one on a fresh patch.
    torch.testing.assert_close(_sample(model, noise, 1.0, pos, pos), dense_before, rtol=0, atol=0)
    torch.testing.assert_close(_sample(patched, noise, 1.0, pos, pos),
                               _sample(_patched(nodes, model), noise, 1.0, pos, pos), rtol=0, atol=0)


def test_back_to_back_runs_at_different_resolutions_share_nothing(env, rng):
    nodes, model, _ = env
    pos, neg = _encode(nodes, POS), _encode(nodes, NEG)
    patched = _patched(nodes, model)
    small = torch.randn(_latent(**SPARSE_LATENT).shape, generator=rng)
    large = torch.randn(_latent(width=256, height=192, length=9).shape, generator=rng)
    shared = [_sample(patched, n, cfg, pos, neg) for n, cfg in [(small, 2.0), (large, 1.0), (small, 2.0)]]
    fresh_small = _sample(_patched(nodes, model), small, 2.0, pos, neg)
    fresh_large = _sample(_patched(nodes, model), large, 1.0, pos, neg)
    for got, ref in zip(shared, [fresh_small, fresh_large, fresh_small]):   # one MODEL, queued one after another
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


# ---- 5. Load Compressed DiT alone (no Sparse Sampler): cfg > 1 with a negative prompt of other padding --------
def test_load_compressed_dit_takes_cfg_with_a_differently_padded_negative(env, rng, tmp_path):
    """Load Compressed DiT's MODEL goes to a stock KSampler too: its text masks must be batched like the
    sparse patch's (was: the raw 'expanded size ... Target sizes: [1, 24]' error from ComfyUI's model)."""
    import copy

    import folder_paths
    from quantsparse_core.io.checkpoint import load_compressed, save_compressed
    from quantsparse_core.quant.policy import default_policy, quantize_model
    nodes, model, core = env
    rtn = copy.deepcopy(core)
    policy = default_policy(rtn, 4, 16)  # weight-only: no activation rounding, so ComfyUI equals the core tightly
    quantize_model(rtn, policy)
    folder = tmp_path / "diffusion_models"
    (folder / "quantsparse").mkdir(parents=True)
    save_compressed(rtn, folder / "quantsparse" / "rtn w4.safetensors", policy)
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    (loaded,) = nodes["QuantSparseLoadCompressedDiT"].execute("quantsparse/rtn w4.safetensors").result
    pos, neg = _encode(nodes, POS), _encode(nodes, NEG)
    noise = torch.randn(_latent().shape, generator=rng)
    got = _sample(loaded, noise, 2.0, pos, neg)
    ref_model, _ = load_compressed(folder / "quantsparse" / "rtn w4.safetensors")
    ref = _core_cfg(ref_model, noise, _sigmas(model), _cond_tuple(pos), _cond_tuple(neg), 2.0)
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < 1e-4, _rel(got, ref)

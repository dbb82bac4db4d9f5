"""The sparse patch (nodes/sparse_patch.py) on ComfyUI's plain Wan transformer (WanModel).

ComfyUI's KSampler over a Wan model patched with apply_sparse equals our WanDiT sampled with SSARAttention
(same weights, noise, sigmas and settings); at density 1 it equals the unpatched ComfyUI model. Only each
block's self-attention reaches SSAR (txt_len 0, the call's grid): cross-attention over text and CLIP tokens
goes to the previous override unchanged, also when the text is as long as the video. Wan-based models the
patch does not cover are refused, and extra self-attention tokens stop the run instead of getting wrong masks.

Small random-weight Wan models (the wan-test presets: width 256, 2 heads of 128, 2 blocks), float32 on the
CPU, loaded through ComfyUI's own loader. Runs only with COMFYUI_PATH set (tests/comfy_env.py).
"""
import dataclasses
import importlib
from types import SimpleNamespace

import pytest
import torch

from quantsparse_core.models.attention import StepInfo
from quantsparse_core.models.wan import WanDiT, get_wan_preset
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

from comfy_env import record_sparse_calls
from random_weights import WAN_QK_GAINS, fill_random
from test_comfy_nodes import load_pack

PACK = "comfyui_quantsparse_under_test"
LATENT = (3, 16, 16)   # patch (1, 2, 2) -> grid (3, 8, 8): 192 video tokens
GRID, VIDEO = (3, 8, 8), 192
TEXT = 4096
STEPS, SEED = 5, 7
PRESETS = {
    "t2v": get_wan_preset("wan-test"),
    "i2v": get_wan_preset("wan-test-i2v"),                                    # CLIP tokens in cross-attention
    "ti2v": dataclasses.replace(get_wan_preset("wan-test"), in_dim=48, out_dim=48),  # Wan 2.2 TI2V 5B's layout
}
# A dense first step, then refresh / reuse every other step; blocks of 16 tokens (12 per side at 192 tokens).
SETTINGS = SparseSettings(density=0.2, tau=2, svd_rank=0, order=2, warmup_steps=1, warmup_blocks=0, block=16,
                          n_rows=32, placement="exact", schedule="standard")


def _sp():
    load_pack()
    return importlib.import_module(f"{PACK}.nodes.sparse_patch")


def _random_wan(rng, name) -> WanDiT:
    return fill_random(WanDiT(PRESETS[name]), rng, WAN_QK_GAINS)


def _patcher(sd):
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    assert patcher is not None and type(patcher.model.diffusion_model).__name__ in ("WanModel", "VaceWanModel")
    return patcher


def _cond(rng, text_len, clip_len=0):
    extra = {}
    if clip_len:  # what CLIPVisionEncode gives WanImageToVideo: its penultimate hidden states
        extra["clip_vision_output"] = SimpleNamespace(
            penultimate_hidden_states=torch.randn(1, clip_len, 1280, generator=rng))
    return [[torch.randn(1, text_len, TEXT, generator=rng), extra]]


def _latent(channels, frames=LATENT[0]):
    return {"samples": torch.zeros(1, channels, frames, *LATENT[1:])}


def _sample(model, positive, negative, latent, cfg=1.0, steps=STEPS):
    import nodes as comfy_nodes  # ComfyUI's own KSampler
    with torch.inference_mode():
        (out,) = comfy_nodes.common_ksampler(model, SEED, steps, cfg, "euler", "simple", positive, negative, latent)
    return out["samples"]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _with_previous_override(patcher, record):
    """A clone whose transformer_options carry a recording optimized_attention_override (a stand-in for another
    node's) that calls ComfyUI's attention unchanged."""
    def previous(func, *args, **kwargs):
        to = kwargs["transformer_options"]
        record.append((to.get("block_index"), args[0].shape[1], args[1].shape[1]))
        return func(*args, **kwargs)

    clone = patcher.clone()
    to = dict(clone.model_options.get("transformer_options", {}))
    to["optimized_attention_override"] = previous
    clone.model_options["transformer_options"] = to
    return clone


def _count_model_calls(patcher, calls):
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        calls.append(args[0].shape[0])
        return executor(*args, **kwargs)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test_count", wrapper)


@pytest.fixture
def ssar_calls(monkeypatch):
    """(block index, txt_len, grid, q shape, step) of every attention call that reaches SSAR."""
    def record(attn, q, mask, c):
        assert mask is None and c.block_type == "double"
        return c.block_index, c.txt_len, tuple(c.grid), tuple(q.shape), c.step.index
    return record_sparse_calls(monkeypatch, _sp(), record)


# ---- (a) equal to the core, and to ComfyUI at density 1 --------------------------------------------------------------
def test_sparse_ksampler_equals_core_wan_with_ssar(rng, ssar_calls):
    import comfy.sample
    import comfy.samplers

    sp = _sp()
    ours = _random_wan(rng, "t2v")
    base = _patcher(ours.state_dict())
    cond = _cond(rng, 9)
    latent = _latent(16)
    patched = sp.apply_sparse(base, SETTINGS)
    got = _sample(patched, cond, cond, latent)
    assert len(ssar_calls) == 2 * STEPS

    # The core alone: the same noise and sigmas, Euler on the velocity, SSAR as the self-attention.
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "simple", STEPS).float()
    x = comfy.sample.prepare_noise(latent["samples"], SEED)
    ssar = SSARAttention(dataclasses.replace(SETTINGS))
    with torch.no_grad(), ours.attention(ssar):
        for i in range(STEPS):
            v = ours(x, sigmas[i:i + 1] * 1000, cond[0][0], step=StepInfo(i, sigmas))
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    ref = base.model.process_latent_out(x)
    assert ssar.stats["sparse"] > 0 and ssar.stats["refresh"] > 0
    rel = _rel(got, ref)
    sparse_effect = _rel(got, _sample(base, cond, cond, latent))
    print(f"ComfyUI KSampler + sparse patch vs core WanDiT + SSAR: relative error {rel:.2e}; sparse vs dense "
          f"{sparse_effect:.2e}")
    # Measured 1.5e-7: ComfyUI's RoPE / norms and ours differ by float32 rounding (tests/test_comfy_wan.py).
    # Sparse vs dense measured 1.7e-3 - 2.5e-3 (random weights: attention is a small part of the output), so a
    # wrong mask, grid or text length in the patch would show up 100x above the tolerance.
    assert rel <= 1e-5, rel
    assert sparse_effect > 2e-4, sparse_effect


@pytest.mark.parametrize("name", ["t2v", "i2v", "ti2v"])
def test_density_one_equals_unpatched_comfyui(rng, ssar_calls, name):
    sp = _sp()
    base = _patcher(_random_wan(rng, name).state_dict())
    channels = PRESETS[name].out_dim
    cond = _cond(rng, 9, clip_len=257 if name == "i2v" else 0)
    neg = _cond(rng, 9, clip_len=257 if name == "i2v" else 0)  # batched with the positive: one call of 2
    patched = sp.apply_sparse(base, dataclasses.replace(SETTINGS, density=1.0))
    got = _sample(patched, cond, neg, _latent(channels), cfg=3.0, steps=3)
    ref = _sample(base, cond, neg, _latent(channels), cfg=3.0, steps=3)
    rel = _rel(got, ref)
    print(f"{name}: density 1 through the patch vs ComfyUI: relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    assert ssar_calls and {c[1:3] for c in ssar_calls} == {(0, GRID)}
    assert {c[3][2] for c in ssar_calls} == {VIDEO}


# ---- (b) only self-attention reaches SSAR ----------------------------------------------------------------------------
def _without_grid_sizes(patcher):
    """Our override sees transformer_options without "grid_sizes" (a ComfyUI whose WanModel does not store it):
    model calls are then told apart by the diffusion wrapper's marker."""
    to = dict(patcher.model_options["transformer_options"])
    ours = to["optimized_attention_override"]

    def stripped(func, *args, **kwargs):
        kwargs["transformer_options"] = {k: v for k, v in kwargs["transformer_options"].items() if k != "grid_sizes"}
        return ours(func, *args, **kwargs)
    to["optimized_attention_override"] = stripped
    patcher.model_options["transformer_options"] = to


CASES = ["t2v-text-as-long-as-video", "t2v-cfg-separate-uncond", "i2v-clip-and-text-as-video",
         "t2v-cfg-separate-uncond-no-grid-sizes"]


@pytest.mark.parametrize("case", CASES)
def test_only_self_attention_reaches_ssar(rng, ssar_calls, case):
    """Cross-attention (text; I2V: CLIP image tokens, then text) reaches the previous override unchanged, also
    with as many text / CLIP tokens as video tokens, so shapes cannot tell it from self-attention. At cfg 3 with a
    negative ComfyUI cannot batch with the positive (7 vs 192 tokens), cond and uncond are two model calls."""
    sp = _sp()
    name = case.split("-")[0]
    i2v = name == "i2v"
    base = _patcher(_random_wan(rng, name).state_dict())
    cond = _cond(rng, VIDEO, clip_len=VIDEO if i2v else 0)
    cfg, neg = (3.0, _cond(rng, 7)) if "cfg" in case else (1.0, cond)
    record, model_calls = [], []
    patched = sp.apply_sparse(_with_previous_override(base, record), SETTINGS)
    _count_model_calls(patched, model_calls)
    if case.endswith("no-grid-sizes"):
        _without_grid_sizes(patched)
    got = _sample(patched, cond, neg, _latent(16), cfg=cfg, steps=3)
    assert torch.isfinite(got).all()
    blocks = PRESETS[name].num_layers
    per_step = 2 if cfg > 1 else 1
    assert len(model_calls) == 3 * per_step and set(model_calls) == {1}
    assert len(ssar_calls) == blocks * len(model_calls)
    assert [c[0] for c in ssar_calls] == list(range(blocks)) * len(model_calls)
    assert {c[1:4] for c in ssar_calls} == {(0, GRID, (1, 2, VIDEO, 128))}
    assert [c[4] for c in ssar_calls] == [s for s in range(3) for _ in range(blocks * per_step)]
    # Every cross-attention went to the previous override, none of the self-attention: per block and model call
    # one text call (I2V: the CLIP call first), queries over the video tokens.
    cross = 2 if i2v else 1
    assert len(record) == blocks * len(model_calls) * cross
    assert [r[0] for r in record] == [b for _ in model_calls for b in range(blocks) for _ in range(cross)]
    keys = {r[2] for r in record}
    assert {r[1] for r in record} == {VIDEO} and keys == ({VIDEO, 7} if cfg > 1 else {VIDEO})


def test_auto_cache_placement_counts_wan_blocks_and_fused_follows_the_setting(rng):
    sp = _sp()
    fb = importlib.import_module(f"{PACK}.nodes.fused_blocks")
    base = _patcher(_random_wan(rng, "t2v").state_dict())
    patched = sp.apply_sparse(base, SparseSettings(warmup_blocks=1), fused=True)
    run = patched.model_options["transformer_options"][sp.KEY]
    assert run.wan and run.settings.layers == 2 - 1
    assert fb.is_fused(patched)  # the fused Wan blocks (nodes/fused_wan.py)
    assert not fb.is_fused(sp.apply_sparse(patched, SparseSettings(warmup_blocks=1), fused=False))
    assert "quantsparse_sparse" not in base.model_options.get("transformer_options", {})  # the input stays dense


# ---- token layouts the masks do or do not cover ----------------------------------------------------------------------
def test_time_dim_concat_frames_join_the_grid(rng, ssar_calls):
    """Phantom (WanPhantomSubjectToVideo) concatenates subject-image latents after the video frames: ComfyUI's
    RoPE places them as further frames, so the grid is (3 + 1, 8, 8)."""
    sp = _sp()
    base = _patcher(_random_wan(rng, "t2v").state_dict())
    cond = _cond(rng, 9)
    cond[0][1]["time_dim_concat"] = torch.randn(1, 16, 1, *LATENT[1:], generator=rng)
    got = _sample(sp.apply_sparse(base, dataclasses.replace(SETTINGS, density=1.0)), cond, cond, _latent(16), steps=2)
    ref = _sample(base, cond, cond, _latent(16), steps=2)
    assert _rel(got, ref) <= 1e-5
    assert {c[1:4] for c in ssar_calls} == {(0, (4, 8, 8), (1, 2, 256, 128))}


def test_extra_self_attention_tokens_are_refused(rng):
    """In-context reference latents (context_latents) append tokens to the self-attention sequence: the run stops
    with the cause rather than using masks built for the grid."""
    sp = _sp()
    base = _patcher(_random_wan(rng, "t2v").state_dict())
    cond = _cond(rng, 9)
    cond[0][1]["context_latents"] = [torch.randn(1, 16, 1, *LATENT[1:], generator=rng)]
    with pytest.raises(ValueError, match=r"self-attention has 256 query and 256 key tokens, but the video grid "
                                         r"\(3, 8, 8\) has 192.*context_latents"):
        _sample(sp.apply_sparse(base, SETTINGS), cond, cond, _latent(16), steps=2)


# ---- (c) Wan-based models the patch does not cover -------------------------------------------------------------------
def _comfy_state_dict(rng, cls, **config):
    import comfy.ops
    dm = cls(operations=comfy.ops.disable_weight_init, device="meta", dim=256, ffn_dim=512, num_heads=2, num_layers=2,
             **config)
    return {k: torch.randn(v.shape, generator=rng) * 0.05 for k, v in dm.state_dict().items()}


@pytest.mark.parametrize("kind", ["vace", "fun-reference"])
def test_wan_based_models_are_refused(rng, kind):
    sp = _sp()  # skips without ComfyUI, before importing it
    from comfy.ldm.wan.model import VaceWanModel, WanModel

    if kind == "vace":
        model = _patcher(_comfy_state_dict(rng, VaceWanModel, vace_layers=1, vace_in_dim=96))
        seen = "VaceWanModel"
    else:
        model = _patcher(_comfy_state_dict(rng, WanModel, in_dim_ref_conv=16))
        assert model.model.diffusion_model.ref_conv is not None
        seen = "Wan Fun (reference image)"
    with pytest.raises(ValueError) as err:
        sp.apply_sparse(model, SETTINGS, node_name="QuantSparse Sparse Attention")
    msg = str(err.value)
    assert msg.startswith(f"QuantSparse Sparse Attention does not support this MODEL: it is {seen}"), msg
    assert "supports HunyuanVideo 1.0 T2V, HunyuanVideo 1.0 I2V, Wan 2.1/2.2 T2V, Wan 2.1 I2V" in msg, msg


def test_dense_passes_run_comfyuis_attention_with_dense_attention_comfyui(rng):
    """Sparse Sampler dense_attention "comfyui" (SparseSettings.host_attention): the dense passes (step 0, each
    refresh's full output) go to the attention ComfyUI is set to, here an override placed before ours (as a Model
    Attention Backend node does), as head-split [B, H, L, D] calls; the sparse passes never do. With that
    override calling ComfyUI's SDPA unchanged the samples equal the quantsparse dense path's."""
    sp = _sp()
    base = _patcher(_random_wan(rng, "t2v").state_dict())
    cond, latent = _cond(rng, 9), _latent(16)
    out, seen = {}, {}
    for host in (False, True):
        seen[host] = []  # (block index, q.shape[1], k.shape[1]): heads for a head-split call, tokens otherwise
        clone = _with_previous_override(base, seen[host])
        out[host] = _sample(sp.apply_sparse(clone, dataclasses.replace(SETTINGS, host_attention=host)), cond, cond,
                            latent)
    kinds = SETTINGS.plan(STEPS).kinds()
    heads = PRESETS["t2v"].num_heads
    self_calls = [r for r in seen[True] if r[1:] == (heads, heads)]  # head-split q and k: the dense passes
    assert len(self_calls) == PRESETS["t2v"].num_layers * sum(k in ("dense", "refresh") for k in kinds) > 0
    assert not [r for r in seen[False] if r[1] == heads]  # without it only cross-attention reaches the override
    assert len(seen[True]) - len(self_calls) == len(seen[False])  # the same cross-attention calls either way
    assert _rel(out[True], out[False]) < 1e-5

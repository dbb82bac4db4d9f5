"""Our fused Wan block inside ComfyUI's WanModel (nodes/fused_wan.py) equals ComfyUI's WanAttentionBlock.

Runs only with COMFYUI_PATH set. ComfyUI's own model runs once with its blocks and once with the block
replacements (same module, same weights, fresh random inputs), in fp32 on the CPU, where the fused groups run
eagerly (torch.compile and the Triton producers are GPU-only): text-to-video and 2.1 image-to-video (CLIP
tokens before the text), batch 2, an odd token grid, whole and in token chunks; a compressed checkpoint through
Load Compressed DiT; Wan 2.2 TI2V's per-frame timesteps fall back to ComfyUI's block."""
import dataclasses

import pytest
import torch

from quantsparse_core.models import WanDiT, get_wan_preset
from test_comfy_fused_blocks import _fused_calls, _rel, pack  # noqa: F401  (pack: the fixture)

LAYERS = 2  # wan-test's blocks


def _random_wan(rng, preset="wan-test", **changes):
    config = dataclasses.replace(get_wan_preset(preset), **changes)
    ours = WanDiT(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    return ours


def _patcher(model):
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model_state_dict(model.state_dict(), model_options={"dtype": torch.float32})
    assert type(patcher.model.diffusion_model).__name__ == "WanModel"
    return patcher


def _inputs(config, rng, frames=3):
    x = torch.randn(2, config.in_dim, frames, 6, 10, generator=rng)   # 3 x 3 x 5 tokens after the 2x2 patch
    t = torch.rand(2, generator=rng) * 1000
    ctx = torch.randn(2, 7, config.text_dim, generator=rng)
    kw = {"clip_fea": torch.randn(2, 257, 1280, generator=rng)} if config.model_type == "i2v" else {}
    return x, t, ctx, kw


def _forward(patcher, x, t, ctx, **kw):
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers
    with torch.inference_mode():
        return patcher.model.diffusion_model(x, t, ctx, transformer_options=to, **kw)


@pytest.mark.parametrize("chunk", ["0", "8"], ids=["whole", "token-chunks-of-8"])
@pytest.mark.parametrize("preset", ["wan-test", "wan-test-i2v"], ids=["t2v", "i2v"])
def test_replacement_equals_comfyui_wan_blocks_fp32(pack, rng, monkeypatch, preset, chunk):
    from quantsparse_core.models import fusion
    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, chunk)
    fb = pack["fused_blocks"]
    model = _random_wan(rng, preset)
    base = _patcher(model)
    fused = fb.apply_fused_blocks(base)
    assert fb.is_fused(fused) and not fb.is_fused(base)
    assert set(fb._replacements(fused)) == {("double_block", i) for i in range(LAYERS)}
    x, t, ctx, kw = _inputs(model.config, rng)
    ref = _forward(base, x, t, ctx, **kw)
    before = dict(fb.counts)
    got = _forward(fused, x, t, ctx, **kw)
    assert _fused_calls(fb, before) == {"wan": LAYERS}  # every block ran fused, none fell back
    rel = _rel(got, ref)
    print(f"{preset}: fused Wan blocks vs ComfyUI's, fp32: relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    off = fb.apply_fused_blocks(fused, enabled=False)
    assert not fb.is_fused(off)
    torch.testing.assert_close(_forward(off, x, t, ctx, **kw), ref, rtol=0, atol=0)


@pytest.mark.parametrize("a_bits", [16, 8], ids=["W4A16-weight-only", "W4A8"])
def test_replacement_equals_comfyui_wan_blocks_on_compressed_model(pack, rng, tmp_path, monkeypatch, a_bits):
    """Load Compressed DiT's Wan model (ComfyUI ops with QuantLinear inside, manual-cast norms), in token chunks."""
    from quantsparse_core.io.rtn import compress_rtn
    from quantsparse_core.models import fusion
    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, "16")
    fb, ops = pack["fused_blocks"], pack["comfy_ops"]
    model = _random_wan(rng)
    path = tmp_path / "wan.safetensors"
    compress_rtn({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path, 4, a_bits)
    base = ops.load_compressed_patcher(path)
    assert any(getattr(m, "quant", None) is not None for m in base.model.diffusion_model.modules())
    fused = fb.apply_fused_blocks(base)
    x, t, ctx, kw = _inputs(model.config, rng)
    ref = _forward(base, x, t, ctx, **kw)
    before = dict(fb.counts)
    got = _forward(fused, x, t, ctx, **kw)
    assert _fused_calls(fb, before) == {"wan": LAYERS}
    rel = _rel(got.float(), ref.float())
    print(f"compressed Wan W4A{a_bits}: fused vs ComfyUI's blocks, relative error {rel:.2e}")
    assert torch.isfinite(got).all() and rel <= (1e-5 if a_bits == 16 else 1e-3), rel


def test_per_frame_timesteps_run_fused_and_attention_patches_fall_back(pack, rng):
    """Wan 2.2 TI2V's per-frame timesteps (vec [B, frames, 6, C], repeated over each frame's tokens) run fused and
    equal ComfyUI's blocks; an attn2 patch makes every block run ComfyUI's code."""
    fb = pack["fused_blocks"]
    model = _random_wan(rng, in_dim=48, out_dim=48)
    base = _patcher(model)
    fused = fb.apply_fused_blocks(base)
    x, _, ctx, _ = _inputs(model.config, rng)
    t = torch.rand(2, 3, generator=rng) * 1000  # one timestep per latent frame, as WAN22's extra_conds give
    ref = _forward(base, x, t, ctx)
    before = dict(fb.counts)
    got = _forward(fused, x, t, ctx)
    assert _fused_calls(fb, before) == {"wan": LAYERS}
    rel = _rel(got, ref)
    print(f"TI2V per-frame timesteps: fused vs ComfyUI's blocks, relative error {rel:.2e}")
    assert rel <= 1e-5, rel

    x, t, ctx, _ = _inputs(get_wan_preset("wan-test"), rng)
    plain = fb.apply_fused_blocks(_patcher(_random_wan(rng)))
    patched = plain.clone()
    patched.set_model_attn2_patch(lambda args: args["x"])
    before = dict(fb.counts)
    _forward(patched, x, t, ctx)
    assert _fused_calls(fb, before) == {"fallback: attn2 patches are set": LAYERS}


def test_composes_with_sparse_sampling(pack, rng):
    """apply_sparse turns the fused Wan blocks on by default: a KSampler run with SSAR (dense step, refreshes,
    reuse) runs every block fused and equals the same run on ComfyUI's blocks."""
    from test_comfy_wan_sparse import SETTINGS, _cond, _latent, _sample
    fb, sp = pack["fused_blocks"], pack["sparse_patch"]
    base = _patcher(_random_wan(rng))
    cond = _cond(rng, 9)
    runs = {}
    for fused in (False, True):
        patched = sp.apply_sparse(base, SETTINGS, fused=fused)
        assert fb.is_fused(patched) == fused
        before = dict(fb.counts)
        runs[fused] = _sample(patched, cond, cond, _latent(16), steps=4)
        assert _fused_calls(fb, before) == ({"wan": 4 * LAYERS} if fused else {})
    rel = _rel(runs[True], runs[False])
    print(f"Wan sparse sampling, fused vs ComfyUI's blocks: relative error {rel:.2e}")
    assert torch.isfinite(runs[True]).all() and rel <= 1e-5, rel


def test_a_forward_patched_on_an_instance_falls_back(pack, rng, monkeypatch):
    """Another node's object patch on a module the fused form does not call (a block's self-attention here) is
    honoured: that block runs ComfyUI's code, with the patched forward."""
    fb = pack["fused_blocks"]
    base = _patcher(_random_wan(rng))
    fused = fb.apply_fused_blocks(base)
    x, t, ctx, _ = _inputs(get_wan_preset("wan-test"), rng)
    sa = base.model.diffusion_model.blocks[0].self_attn
    original = type(sa).forward
    seen = []
    monkeypatch.setattr(sa, "forward", lambda *a, **k: seen.append(1) or original(sa, *a, **k), raising=False)
    before = dict(fb.counts)
    got = _forward(fused, x, t, ctx)
    assert seen == [1]
    assert _fused_calls(fb, before) == {"wan": 1,
                                        "fallback: WanSelfAttention's forward is patched or hooked on the instance": 1}
    assert _rel(got, _forward(base, x, t, ctx)) <= 1e-5


def test_loras_on_the_compressed_wan_model_run_in_the_fused_blocks(pack, rng, tmp_path):
    """A LoRA loaded by ComfyUI's own loader (LoraLoaderModelOnly's call) on a compressed Wan model: the fused
    blocks run its side paths on the quantized layers (self-attention, cross-attention, FFN) as ComfyUI's blocks do."""
    import comfy.model_management
    import comfy.sd
    from quantsparse_core.io.rtn import compress_rtn
    fb, ops = pack["fused_blocks"], pack["comfy_ops"]
    model = _random_wan(rng)
    path = tmp_path / "wan.safetensors"
    compress_rtn({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path, 4, 16)
    base = ops.load_compressed_patcher(path)
    named = dict(model.named_modules())
    sd = {}
    for name in ("blocks.0.self_attn.q", "blocks.0.cross_attn.q", "blocks.1.ffn.0", "blocks.1.self_attn.v"):
        out_f, in_f = named[name].weight.shape
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=rng) / in_f ** 0.5
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=rng)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    with_lora = comfy.sd.load_lora_for_models(base, None, sd, 0.8, 0.0)[0]
    x, t, ctx, _ = _inputs(model.config, rng)
    outs = {}
    try:
        for label, patcher in (("base", base), ("lora", with_lora), ("fused lora", fb.apply_fused_blocks(with_lora))):
            comfy.model_management.load_models_gpu([patcher])
            before = dict(fb.counts)
            outs[label] = _forward(patcher, x, t, ctx).clone()
            assert _fused_calls(fb, before) == ({"wan": LAYERS} if label == "fused lora" else {})
    finally:
        comfy.model_management.unload_all_models()
    assert _rel(outs["lora"], outs["base"]) > 1e-3  # the LoRA changes the output
    rel = _rel(outs["fused lora"], outs["lora"])
    print(f"compressed Wan + LoRA: fused vs ComfyUI's blocks, relative error {rel:.2e}")
    assert rel <= 1e-5, rel


def test_a_forward_patch_undone_as_comfyui_undoes_it_is_no_patch(pack, rng):
    """ComfyUI undoes an object patch by setting the saved attribute back (comfy.utils.set_attr): the instance
    then holds its class's own forward, bound to it, and the block runs fused again. A forward hook is a patch."""
    import comfy.utils
    fb = pack["fused_blocks"]
    base = _patcher(_random_wan(rng))
    fused = fb.apply_fused_blocks(base)
    x, t, ctx, _ = _inputs(get_wan_preset("wan-test"), rng)
    dm = base.model.diffusion_model
    key = "blocks.1.norm1.forward"
    saved = comfy.utils.set_attr(dm, key, lambda h: torch.nn.functional.layer_norm(h, h.shape[-1:], eps=1e-6))
    comfy.utils.set_attr(dm, key, saved)
    assert "forward" in vars(dm.blocks[1].norm1)
    before = dict(fb.counts)
    _forward(fused, x, t, ctx)
    assert _fused_calls(fb, before) == {"wan": LAYERS}
    handle = dm.blocks[0].ffn.register_forward_hook(lambda m, i, o: o)
    try:
        before = dict(fb.counts)
        _forward(fused, x, t, ctx)
        assert _fused_calls(fb, before) == {"wan": 1,
                                            "fallback: Sequential's forward is patched or hooked on the instance": 1}
    finally:
        handle.remove()

"""Hook LoRAs (ComfyUI's CreateHookLora + hook keyframes, set per conditioning) on Load Compressed DiT's MODEL.

Runs only with COMFYUI_PATH set. A random test-preset DiT is compressed (RTN) and loaded like Load
Compressed DiT; a random LoRA on every quantized layer is made into a hook with ComfyUI's own
comfy.hooks.create_hook_lora, attached to the positive conditioning with set_hooks_for_conditioning, and
the MODEL is sampled with comfy.sample.sample (what KSampler runs). The reference for every model call is
the same MODEL with the LoRA loaded statically (comfy.sd.load_lora_for_models, already tested against
"merge, then compress" in test_comfy_lora_save.py) at the hook's strength at that call. fp32 on the CPU.
"""
import logging

import torch

from test_comfy_lora_save import _compress, _load_lora, _lora, _quantized, _random_dit, _rel
from test_comfy_lora_save import one_thread_and_unload, ops  # noqa: F401  (fixtures)

STRENGTH = 0.7


def _setup(ops, rng, tmp_path):
    dit = _random_dit(rng)
    policy = _compress(dit, tmp_path / "base.safetensors")
    base = ops.load_compressed_patcher(tmp_path / "base.safetensors")
    sd, _ = _lora(dit, list(policy), rng, rank=4, scale=1.0, naming="lora_unet")
    cond = [[torch.randn(1, 7, 32, generator=rng), {"pooled_output": torch.randn(1, 768, generator=rng), "guidance": 6.0}]]
    latent = torch.zeros(1, 16, 2, 8, 8)
    noise = torch.randn(latent.shape, generator=rng)
    return base, sd, cond, latent, noise


def _hooks(sd, keyframes=()):
    import comfy.hooks
    hooks = comfy.hooks.create_hook_lora(sd, strength_model=STRENGTH, strength_clip=0.0)
    if keyframes:
        group = comfy.hooks.HookKeyframeGroup()
        for strength, start in keyframes:
            group.add(comfy.hooks.HookKeyframe(strength=strength, start_percent=start))
        hooks.set_keyframes_on_hooks(group)
    return hooks


def _sample(model, noise, latent, positive, negative, cfg, steps=6, record=None):
    import comfy.patcher_extension
    import comfy.sample
    model = model.clone()
    if record is not None:
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", record)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                                   denoise=1.0, disable_pbar=True, seed=0)


def _call_without_wrappers(patcher, args, kwargs):
    """patcher's apply_model on a recorded call's arguments, minus that run's wrappers (BaseModel.apply_model
    takes transformer_options as its 6th argument)."""
    args, kwargs = list(args), dict(kwargs)
    if len(args) > 5:
        args[5] = {k: v for k, v in args[5].items() if k != "wrappers"}
    else:
        kwargs["transformer_options"] = {k: v for k, v in kwargs["transformer_options"].items() if k != "wrappers"}
    return patcher.model.apply_model(*args, **kwargs)


def test_hook_lora_equals_the_same_lora_loaded_on_the_model(ops, rng, tmp_path, caplog):
    """A hook LoRA at a constant strength is the static LoRA at that strength (same side path, same floats:
    1e-6 allows only reordering), with nothing logged by ComfyUI's weight path (which cannot patch a packed
    layer and used to log an error per key); and it changes the output (a dropped hook fails)."""
    import comfy.hooks
    base, sd, cond, latent, noise = _setup(ops, rng, tmp_path)
    hooked_cond = comfy.hooks.set_hooks_for_conditioning(cond, _hooks(sd))
    with caplog.at_level(logging.WARNING):
        hooked = _sample(base, noise, latent, hooked_cond, hooked_cond, cfg=1.0)
    assert "ERROR" not in caplog.text and "could not patch" not in caplog.text and "would not patch" not in caplog.text
    static = _sample(_load_lora(base, sd, STRENGTH), noise, latent, cond, cond, cfg=1.0)
    plain = _sample(base, noise, latent, cond, cond, cfg=1.0)
    print(f"hook vs static LoRA {_rel(hooked, static):.2e}; LoRA effect {_rel(plain, static):.3f}")
    assert _rel(hooked, static) <= 1e-6
    assert _rel(plain, static) > 1e-2
    assert all(m.side_paths.parts["hooked"][1] is None for m in _quantized(base).values())  # none left behind
    plain_again = _sample(base, noise, latent, cond, cond, cfg=1.0)
    assert torch.equal(plain_again, plain)


def test_keyframed_hook_on_the_positive_only_follows_its_strength_per_call(ops, rng, tmp_path):
    """Keyframes 1.0 from 0% and 0.25 from 50% on the positive prompt, none on the negative, cfg 2.5: every
    model call (cond and uncond are separate calls, as their hooks differ) must equal the MODEL with the
    static LoRA at the strength ComfyUI's keyframe gave that call (0 for the negative), within 1e-5."""
    import comfy.hooks
    import comfy.model_management
    base, sd, cond, latent, noise = _setup(ops, rng, tmp_path)
    positive = comfy.hooks.set_hooks_for_conditioning(cond, _hooks(sd, [(1.0, 0.0), (0.25, 0.5)]))
    negative = [[torch.randn(1, 7, 32, generator=rng), dict(cond[0][1])]]
    calls = []

    def record(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        hooks = executor.class_obj.current_patcher.current_hooks
        strength = 0.0 if hooks is None else float(hooks.hooks[0].strength)
        calls.append((args, kwargs, strength, out.clone()))
        return out

    _sample(base, noise, latent, positive, negative, cfg=2.5, record=record)
    strengths = [c[2] for c in calls]
    assert sorted(set(strengths)) == [0.0, 0.25, 1.0], strengths  # both keyframes ran, and unhooked calls

    refs = {0.0: base, 0.25: _load_lora(base, sd, STRENGTH * 0.25), 1.0: _load_lora(base, sd, STRENGTH)}
    for strength, ref in refs.items():
        comfy.model_management.load_models_gpu([ref])
        for args, kwargs, s, out in calls:
            if s != strength:
                continue
            with torch.inference_mode():
                want = _call_without_wrappers(ref, args, kwargs)
            assert _rel(out, want) <= 1e-5, (strength, _rel(out, want))
    # the LoRA matters at each strength used: a side path stuck at another strength fails above
    first = next(c for c in calls if c[2] == 1.0)
    comfy.model_management.load_models_gpu([base])
    with torch.inference_mode():
        without = _call_without_wrappers(base, first[0], first[1])
    assert _rel(first[3], without) > 1e-2


def test_side_paths_are_computed_once_and_hook_patches_do_not_pile_up(ops, rng, tmp_path, monkeypatch):
    """A static LoRA plus a hook on the positive prompt at cfg 2.5: ComfyUI ejects and re-injects the patcher at
    every switch between cond and uncond, which must not recompute the side paths (each layer's static pair once
    per run, its hooked pair once per hook state), nor keep hooks of earlier runs; unloading drops them all."""
    import importlib

    import comfy.hooks
    import comfy.model_management

    from test_comfy_lora_save import PACK
    side = importlib.import_module(f"{PACK}.nodes.lora_side")
    base, sd, cond, latent, noise = _setup(ops, rng, tmp_path)
    layers = _quantized(base)
    made = []
    real = side._low_rank
    monkeypatch.setattr(side, "_low_rank", lambda patch, m: made.append(m) or real(patch, m))
    model = _load_lora(base, sd, 0.5)
    negative = [[torch.randn(1, 7, 32, generator=rng), dict(cond[0][1])]]
    calls = []
    for _ in range(2):   # a new hook per run, as a re-executed CreateHookLora makes
        positive = comfy.hooks.set_hooks_for_conditioning(cond, _hooks(sd))
        _sample(model, noise, latent, positive, negative, cfg=2.5, record=lambda ex, *a, **k: calls.append(1) or ex(*a, **k))
        store = model.model.__dict__["quantsparse_hook_patches"]
        assert len(store) == 1   # only this run's hook
    assert len(calls) >= 20      # 6 steps x 2 (cond, uncond) per run
    # per layer and run: the static pair once and the hooked pair once (ComfyUI detaches the first run's clone
    # when it loads the second's, which drops the side paths), never per model call
    assert len(made) == 2 * 2 * len(layers), (len(made), len(layers))
    comfy.model_management.unload_all_models()
    assert all(m.lora is None and not any(m.side_paths.kept.values()) for m in layers.values())

"""Sparse Sampler (QuantSparse) with cfg > 1, a negative prompt of another length and batch-2 latents, inside
ComfyUI 0.29 (COMFYUI_PATH), equal to quantsparse_core's SSAR run on its own DiT.

ComfyUI batches cond and uncond into one model call; their padded text masks differ, so the pack runs each
mask's entries as one call (nodes/sparse_patch.py: text_mask_wrapper) and each keeps its own SSAR state.
The reference: the core model with one SSARAttention per prompt, fed the same noise and sigmas.
"""
import pytest
import torch

from comfy_env import require_comfyui
from test_comfy_cfg_and_leaks import NEG, POS, SPARSE, SPARSE_LATENT, _cond_tuple, _core_cfg, _encode, _latent, _rel, _sigmas
from test_comfy_cfg_and_leaks import one_thread  # noqa: F401  (module fixture: tiny shapes run on one thread)
from test_comfy_nodes import load_pack

STEPS = 4
# Measured: 2e-7 to 6e-7 relative (fp32; ComfyUI's and the core's RoPE/attention differ by rounding only).
TOL = 1e-5


@pytest.fixture(scope="module")
def env(one_thread):  # noqa: F811
    require_comfyui()
    from quantsparse_core.models.tiny.embedded import load_embedded
    nodes = load_pack()
    (model,) = nodes["QuantSparseLoadEmbeddedTinyDiT"].execute().result
    core, _ = load_embedded()
    return nodes, model, core


def _core_sparse(core, noise, sigmas, pos, neg, cfg):
    """Euler + CFG in the core, each prompt with its own SSARAttention (as ComfyUI's cond and uncond)."""
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention
    joint = len(core.double_blocks) + len(core.single_blocks)
    settings = dict(density=SPARSE["density"], tau=SPARSE["refresh_interval"], svd_rank=SPARSE["svd_rank"],
                    warmup_steps=SPARSE["warmup_steps"], warmup_blocks=SPARSE["warmup_blocks"],
                    layers=joint - SPARSE["warmup_blocks"])
    ssar = {"pos": SSARAttention(SparseSettings(**settings)), "neg": SSARAttention(SparseSettings(**settings))}
    return _core_cfg(core, noise, sigmas, pos, neg, cfg, ssar), ssar


@pytest.mark.parametrize("cfg,batch", [(2.0, 1), (1.0, 2), (3.0, 2)])
def test_sparse_sampler_cfg_and_batches_equal_core_ssar(env, rng, cfg, batch):
    import comfy.latent_formats
    import comfy.sample
    nodes, model, core = env
    pos, neg = _encode(nodes, POS), _encode(nodes, NEG)
    latent = {"samples": _latent(batch, **SPARSE_LATENT)}
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    print("seed", seed)
    with torch.inference_mode():
        (out,) = nodes["QuantSparseSparseSampler"].execute(
            model=model, seed=seed, steps=STEPS, cfg=cfg, sampler_name="euler", scheduler="simple", positive=pos,
            negative=neg, latent_image=latent, denoise=1.0, **SPARSE).result
    got = out["samples"] * comfy.latent_formats.HunyuanVideo().scale_factor
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    ref, ssar = _core_sparse(core, noise, _sigmas(model, STEPS), _cond_tuple(pos), _cond_tuple(neg), cfg)
    assert ssar["pos"].stats["sparse"] > 0 and ssar["pos"].stats["refresh"] > 0  # the sparse path ran
    assert torch.isfinite(got).all()
    assert _rel(got, ref) < TOL, _rel(got, ref)
    # ...and it is sparse: the dense model gives a different latent.
    dense = comfy.sample.sample(model, noise, STEPS, cfg, "euler", "simple", pos, neg, torch.zeros_like(noise),
                                seed=seed, disable_pbar=True) * comfy.latent_formats.HunyuanVideo().scale_factor
    assert _rel(dense, ref) > 1e-3


def test_split_batch_keeps_per_entry_labels_and_order(env, rng):
    """A mask that differs inside one cond (a batch-2 conditioning) splits per entry, back in batch order,
    each entry with its own SSAR state: equal to running the two entries one by one."""
    import comfy.sample
    nodes, model, _ = env
    (ctx_a, extra_a), = _encode(nodes, POS)
    (ctx_b, extra_b), = _encode(nodes, NEG)
    both = [[torch.cat([ctx_a, ctx_b]), {"pooled_output": torch.cat([extra_a["pooled_output"], extra_b["pooled_output"]]),
                                         "attention_mask": torch.cat([extra_a["attention_mask"], extra_b["attention_mask"]])}]]
    (patched,) = nodes["QuantSparseSparseAttention"].execute(model=model, **SPARSE).result
    noise = torch.randn(_latent(2, **SPARSE_LATENT).shape, generator=rng)

    def run(cond, n):
        with torch.inference_mode():
            return comfy.sample.sample(patched, n, STEPS, 1.0, "euler", "simple", cond, cond, torch.zeros_like(n),
                                       disable_pbar=True)

    got = run(both, noise)
    one = torch.cat([run(_encode(nodes, POS), noise[:1]), run(_encode(nodes, NEG), noise[1:])])
    assert _rel(got, one) < TOL, _rel(got, one)

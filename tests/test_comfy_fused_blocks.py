"""Our fused blocks inside ComfyUI's HunyuanVideo (nodes/fused_blocks.py) equal ComfyUI's blocks.

Runs only with COMFYUI_PATH set. Each test runs ComfyUI's own model once with its blocks and once with
the block replacements (same module, same weights, fresh random inputs), in fp32 on the CPU, where the
fused groups run eagerly (torch.compile and the Triton producers are GPU-only).
"""
import importlib

import pytest
import torch

from quantsparse_core.models import HunyuanVideoDiT, get_preset

from comfy_env import require_comfyui
from kernel_marks import interpreted
from test_comfy_nodes import load_pack

PACK = "comfyui_quantsparse_under_test"
TXT, MASKED_FROM = 7, 4


@pytest.fixture(scope="module")
def pack():
    require_comfyui()
    load_pack()
    return {name: importlib.import_module(f"{PACK}.nodes.{name}")
            for name in ("fused_blocks", "sparse_patch", "comfy_ops")}


def _random_dit(rng, preset="test"):
    ours = HunyuanVideoDiT(get_preset(preset))
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    return ours


def _comfy_patcher(rng):
    import comfy.sd
    patcher = comfy.sd.load_diffusion_model_state_dict(_random_dit(rng).state_dict(),
                                                       model_options={"dtype": torch.float32})
    assert type(patcher.model.diffusion_model).__name__ == "HunyuanVideo"
    return patcher


def _inputs(rng, batch=1, mask=True):
    x = torch.randn(batch, 16, 2, 8, 8, generator=rng)
    ctx = torch.randn(batch, TXT, 32, generator=rng)
    y = torch.randn(batch, 768, generator=rng)
    t, g = torch.rand(batch, generator=rng) * 1000, torch.full((batch,), 6.0)
    m = None
    if mask:  # ComfyUI's text mask is one [1, 1, L] additive mask for the batch
        m = torch.ones(1, TXT, dtype=torch.long)
        m[0, MASKED_FROM:] = 0
    return x, t, ctx, y, g, m


def _forward(patcher, inputs, **kw):
    """One diffusion-model call as ComfyUI's sampler makes it: the patcher's transformer_options and
    its wrappers (sampler_helpers merges them the same way)."""
    x, t, ctx, y, g, m = inputs
    to = dict(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers
    with torch.inference_mode():
        return patcher.model.diffusion_model(x, t, ctx, y=y, guidance=g, attention_mask=m, transformer_options=to, **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _fused_calls(fb, before):
    return {k: fb.counts[k] - before.get(k, 0) for k in fb.counts if fb.counts[k] != before.get(k, 0)}


@pytest.mark.parametrize("chunk", ["0", "8"], ids=["whole", "token-chunks-of-8"])
@pytest.mark.parametrize("batch,mask", [(1, True), (2, False)], ids=["text-mask", "batch2-no-mask"])
def test_replacement_equals_comfyui_blocks_fp32(pack, rng, monkeypatch, batch, mask, chunk):
    from quantsparse_core.models import fusion
    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, chunk)  # the post-attention work in chunks, or whole
    fb = pack["fused_blocks"]
    base = _comfy_patcher(rng)
    fused = fb.apply_fused_blocks(base)
    assert fb.is_fused(fused) and not fb.is_fused(base)  # the clone only
    inputs = _inputs(rng, batch, mask)
    ref = _forward(base, inputs)
    before = dict(fb.counts)
    got = _forward(fused, inputs)
    assert _fused_calls(fb, before) == {"double": 1, "single": 1}  # both blocks ran fused, no fallback
    rel = _rel(got, ref)
    print(f"fused blocks vs ComfyUI's blocks, fp32: relative error {rel:.2e}")
    assert rel <= 1e-5, rel
    off = fb.apply_fused_blocks(fused, enabled=False)
    assert not fb.is_fused(off)
    torch.testing.assert_close(_forward(off, inputs), ref, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", ["0", "8"], ids=["whole", "token-chunks-of-8"])
@pytest.mark.parametrize("a_bits", [16, 8], ids=["W4A16-weight-only", "W4A8"])
def test_replacement_equals_comfyui_blocks_on_compressed_model(pack, rng, tmp_path, monkeypatch, a_bits, chunk):
    """Load Compressed DiT's model (ComfyUI ops with QuantLinear inside, manual-cast norms); with token
    chunks the single block's linear1 computes its q/k/v rows before attention and its MLP rows per
    chunk (the compressed Linear's forward_rows)."""
    from quantsparse_core.io import save_compressed
    from quantsparse_core.models import fusion
    from quantsparse_core.quant.policy import default_policy, quantize_model

    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, chunk)
    fb, ops = pack["fused_blocks"], pack["comfy_ops"]
    dit = _random_dit(rng)
    policy = default_policy(dit, 4, a_bits)
    quantize_model(dit, policy)
    path = tmp_path / "m.safetensors"
    save_compressed(dit, path, policy)
    base = ops.load_compressed_patcher(path)
    quant = [m for m in base.model.diffusion_model.modules() if getattr(m, "quant", None) is not None]
    assert len(quant) == len(policy)
    assert all(m.input_quant_spec(torch.zeros(1, m.in_features)) is None for m in quant)  # CPU: no producers
    assert all(m.forward_rows is not None for m in quant)
    fused = fb.apply_fused_blocks(base)
    inputs = _inputs(rng)
    ref = _forward(base, inputs)
    linear1 = base.model.diffusion_model.single_blocks[0].linear1
    calls = []  # what linear1 computed in the fused run: "whole" or (start, end, tokens)
    cls = type(linear1)
    forward, rows = cls.forward, cls._forward_rows
    monkeypatch.setattr(cls, "forward", lambda self, x, *a, **k: (
        calls.append("whole") if self is linear1 else None) or forward(self, x, *a, **k))
    monkeypatch.setattr(cls, "_forward_rows", lambda self, x, s, e: (
        calls.append((s, e, x.shape[1])) if self is linear1 else None) or rows(self, x, s, e))
    before = dict(fb.counts)
    got = _forward(fused, inputs)
    assert _fused_calls(fb, before) == {"double": 1, "single": 1}
    length = inputs[0].shape[-3] * inputs[0].shape[-2] * inputs[0].shape[-1] // 4 + inputs[2].shape[1]
    hidden, mlp = linear1.out_features // 7 * 3, linear1.out_features // 7 * 4
    if chunk == "0":
        assert calls == ["whole"]
    else:  # q/k/v rows over all tokens, then the MLP rows per chunk: never the whole 7x-wide output
        n = int(chunk)
        assert calls == [(0, hidden, length)] + [(hidden, hidden + mlp, min(n, length - s)) for s in range(0, length, n)]
    rel = _rel(got, ref)
    print(f"compressed W4A{a_bits}: fused blocks vs ComfyUI's blocks, relative error {rel:.2e}")
    # Weight-only: no activation rounding, the same tolerance as the float model. W4A8: an activation
    # that differs by ~1e-7 (RoPE arithmetic order) may round to the neighbouring int8 code.
    assert rel <= (1e-5 if a_bits == 16 else 1e-3), rel


def test_per_token_modulation_and_env_switch_fall_back(pack, rng, monkeypatch):
    fb = pack["fused_blocks"]
    base = _comfy_patcher(rng)
    fused = fb.apply_fused_blocks(base)
    inputs = _inputs(rng)
    # guiding_frame_index: ComfyUI's token-replace modulation (modulation_dims set): ComfyUI's blocks run.
    gfi = dict(guiding_frame_index=torch.tensor([0.0]))
    before = dict(fb.counts)
    got = _forward(fused, inputs, **gfi)
    assert _fused_calls(fb, before) == {"fallback: per-token modulation (modulation_dims)": 2}
    torch.testing.assert_close(got, _forward(base, inputs, **gfi), rtol=0, atol=0)
    monkeypatch.setenv(fb.ENV, "0")
    before = dict(fb.counts)
    torch.testing.assert_close(_forward(fused, inputs), _forward(base, inputs), rtol=0, atol=0)
    assert _fused_calls(fb, before) == {}


def test_chains_to_an_existing_replacement(pack, rng):
    """A replacement set before ours stays outermost and gets our fused block as its original_block;
    applying twice does not stack; switching off restores it."""
    fb = pack["fused_blocks"]
    base = _comfy_patcher(rng)
    seen = []

    def other(args, extra):
        seen.append(args["transformer_options"]["block_type"])
        return extra["original_block"](args)

    theirs = base.clone()
    theirs.set_model_patch_replace(other, "dit", "double_block", 0)
    fused = fb.apply_fused_blocks(fb.apply_fused_blocks(theirs))
    reps = fb._replacements(fused)
    assert reps[("double_block", 0)].quantsparse_previous is other
    assert reps[("single_block", 0)].quantsparse_previous is None
    inputs = _inputs(rng)
    before = dict(fb.counts)
    got = _forward(fused, inputs)
    assert seen == ["double"] and _fused_calls(fb, before) == {"double": 1, "single": 1}
    assert _rel(got, _forward(base, inputs)) <= 1e-5
    off = fb.apply_fused_blocks(fused, enabled=False)
    assert fb._replacements(off) == {("double_block", 0): other}


def _sample(model, cond, steps=3, seed=5):
    import nodes as comfy_nodes  # ComfyUI's own KSampler
    latent = {"samples": torch.zeros(1, 16, 2, 8, 8)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, 1.0, "euler", "simple", cond, cond, latent)
    return out["samples"]


def test_composes_with_sparse_attention(pack, rng, monkeypatch):
    """apply_sparse turns the fused blocks on by default; the SSAR override still sees every double and
    single attention call (with block_type / block_index), and sampling equals the unfused run."""
    from quantsparse_core.sparse.ssar import SparseSettings

    fb, sp = pack["fused_blocks"], pack["sparse_patch"]
    calls = []
    original = sp.SparseRun.attention_for

    def counting(self, group):
        attn = original(self, group)

        def call(q, k, v, mask, c):
            calls.append((c.block_type, c.block_index, c.step.index if c.step else None))
            return attn(q, k, v, mask, c)
        return call

    monkeypatch.setattr(sp.SparseRun, "attention_for", counting)
    base = _comfy_patcher(rng)
    _, _, ctx, y, _, mask = _inputs(rng)
    cond = [[ctx, {"pooled_output": y, "attention_mask": mask}]]
    settings = SparseSettings(density=0.5, tau=2, svd_rank=4, warmup_steps=1, warmup_blocks=0)
    runs = {}
    for fused in (False, True):
        patched = sp.apply_sparse(base, settings, fused=fused)
        assert fb.is_fused(patched) == fused
        calls.clear()
        before = dict(fb.counts)
        runs[fused] = _sample(patched, cond)
        runs[fused, "calls"] = list(calls)
        assert _fused_calls(fb, before) == ({"double": 3, "single": 3} if fused else {})
    expected = [(kind, 0, step) for step in range(3) for kind in ("double", "single")]
    assert runs[True, "calls"] == runs[False, "calls"] == expected
    # fused=False also turns off fused blocks a loader turned on (Load Compressed DiT does).
    assert not fb.is_fused(sp.apply_sparse(fb.apply_fused_blocks(base), settings, fused=False))
    rel = _rel(runs[True], runs[False])
    print(f"sparse sampling, fused vs ComfyUI's blocks: relative error {rel:.2e}")
    assert rel <= 1e-5, rel


def _require_interpreted_int_gemm():
    """Skip where this Triton's interpreter cannot run kernels.int_gemm at all (Triton 3.5's fails inside
    the kernel's K loop; tests/test_fused_small_ops.py's producer test fails the same way there)."""
    import triton
    from quantsparse_core import dispatch
    from quantsparse_core.quant.linear import QuantLinear
    q = QuantLinear(torch.nn.Linear(64, 32), 4, 8).freeze()
    try:
        with torch.inference_mode(), dispatch.forced("triton"):
            q(torch.randn(3, 64))
    except triton.runtime.errors.InterpreterError as e:
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run kernels.int_gemm ({e}); "
                    "run this test with a newer Triton (3.9 passes) or on a GPU")


@interpreted
def test_producer_quantized_path_through_comfyui_ops(pack, rng, tmp_path, monkeypatch):
    """The GPU path on the CPU (Triton interpreter): on a W4A8 compressed model (smoothing, clip) the
    fused blocks' producers hand Load Compressed DiT's linears QuantizedInputs (every block linear but the
    attention output projections), q/k norm + RoPE run as the kernel, and the output equals ComfyUI's
    blocks running the same QuantLinears with their own activation quantization."""
    from quantsparse_core import dispatch
    from quantsparse_core.quant.linear import QuantLinear

    _require_interpreted_int_gemm()
    fb, ops = pack["fused_blocks"], pack["comfy_ops"]
    base = _compressed_with_smoothing(rng, tmp_path, ops)
    fused = fb.apply_fused_blocks(base)
    calls = []
    real = QuantLinear._forward_quantized
    monkeypatch.setattr(QuantLinear, "_forward_quantized", lambda self, q, *a: calls.append(q) or real(self, q, *a))
    inputs = _inputs(rng)
    with dispatch.forced("triton"):
        ref = _forward(base, inputs)
        assert not calls
        before = dict(fb.counts)
        got = _forward(fused, inputs)
    assert _fused_calls(fb, before) == {"double": 1, "single": 1}
    assert len(calls) == 2 * 3 + 2  # double: qkv, fc1, fc2 per stream; single: linear1, linear2
    rel = _rel(got, ref)
    print(f"producer path (Triton interpreter), fused vs ComfyUI's blocks: relative error {rel:.2e}")
    # As tests/test_fused_small_ops.py: the producer kernels' LayerNorm / GELU differ from PyTorch's in
    # the last bits, which can move a rare int8 code by one step (measured there up to 1.1e-2).
    assert torch.isfinite(got).all() and rel < 2e-2, rel


def _compressed_with_smoothing(rng, tmp_path, ops):
    """A W4A8 compressed test model with random smoothing and clip 0.9, loaded as Load Compressed DiT does."""
    from quantsparse_core.io import save_compressed
    from quantsparse_core.quant.linear import QuantLinear
    from quantsparse_core.quant.policy import default_policy, quantize_model
    dit = _random_dit(rng)
    policy = default_policy(dit, 4, 8)
    quantize_model(dit, policy, smooth=True)
    with torch.no_grad():
        for m in dit.modules():
            if isinstance(m, QuantLinear) and m.log_smooth is not None:
                m.log_smooth.copy_(torch.randn(m.in_features, generator=rng) * 0.3)
                m.a_clip.fill_(0.9)
    path = tmp_path / "m.safetensors"
    save_compressed(dit, path, policy)
    return ops.load_compressed_patcher(path)


def _random_lora(patcher, rng, rank=4, scale=0.05):
    """A LoRA on every block linear (the quantized ones included), loaded as LoraLoaderModelOnly does."""
    import comfy.sd
    sd = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        if name.startswith(("double_blocks.", "single_blocks.")) and isinstance(getattr(m, "in_features", None), int) \
                and not name.endswith(".quant"):
            k = f"diffusion_model.{name}"
            sd[f"{k}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=rng) / m.in_features ** 0.5
            sd[f"{k}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=rng) * scale
    return comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0.0)[0]


@interpreted
@pytest.mark.parametrize("chunk", ["0", "8"], ids=["whole", "token-chunks-of-8"])
def test_lora_keeps_the_producer_quantized_path(pack, rng, tmp_path, monkeypatch, chunk):
    """A LoRA on a compressed MODEL with fused blocks: the producers still hand the quantized layers their
    int8 codes (the LoRA's down projection then runs on those codes, quant.low_rank), and the output agrees,
    within the quantization error, with ComfyUI's blocks, where each layer quantizes its float input itself
    and the LoRA takes that float input."""
    import comfy.model_management
    from quantsparse_core import dispatch
    from quantsparse_core.quant.linear import QuantLinear

    from quantsparse_core.models import fusion
    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, chunk)  # chunks: linear1's rows in parts, on token slices of the codes
    _require_interpreted_int_gemm()
    fb, ops = pack["fused_blocks"], pack["comfy_ops"]
    base = _compressed_with_smoothing(rng, tmp_path, ops)
    lora = _random_lora(base, rng)
    calls, real = [], QuantLinear._forward_quantized
    monkeypatch.setattr(QuantLinear, "_forward_quantized", lambda self, q, *a: calls.append(a) or real(self, q, *a))
    inputs = _inputs(rng)
    fused = fb.apply_fused_blocks(lora)   # kept: a clone dropped by Python detaches (ejects) the shared model
    with dispatch.forced("triton"):
        plain = _forward(fb.apply_fused_blocks(base), inputs)
        calls.clear()
        comfy.model_management.load_models_gpu([fused])   # ComfyUI injects the LoRA side paths on load
        ref = _forward(lora, inputs)
        assert not calls
        got = _forward(fused, inputs)
    # codes, with the side path: double qkv, fc1, fc2 per stream (fc1 / fc2 per token chunk); single linear1, linear2
    assert len(calls) >= 2 * 3 + 2 and all(a and a[0] is not None for a in calls), len(calls)
    rel, effect = _rel(got, ref), _rel(ref, plain)
    print(f"LoRA on the producers' codes vs on the float input: relative error {rel:.2e} (the LoRA moves the "
          f"output by {effect:.2e})")
    # On the codes the LoRA's term carries the activations' quantization error (clip 0.9 here), as it would
    # merged into the weights before compression: measured 1.3-1.7e-2 of the output with the LoRA moving it
    # 12-21% (without a LoRA the two paths agree to 7e-4, test above).
    assert effect > 0.05 and torch.isfinite(got).all() and rel < 3e-2, (rel, effect)
    # QUANTSPARSE_LORA_FLOAT_INPUT=1: the LoRA layers take the float input again, exactly as ComfyUI's blocks
    monkeypatch.setenv(ops.LORA_FLOAT_INPUT_ENV, "1")
    calls.clear()
    with dispatch.forced("triton"):
        exact = _forward(fused, inputs)
    assert not calls and _rel(exact, ref) < 2e-3, _rel(exact, ref)
    comfy.model_management.unload_all_models()

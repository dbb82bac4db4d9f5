"""The fused Wan block (models/fusion_wan.py) computes WanBlock's output: in fp32 with PyTorch ops (the grouping's
math, token chunks included), and W4A8 with the producer-quantized inputs and the q/k RMSNorm + RoPE kernel
(Triton interpreter) against the same block quantizing in each linear."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_core.models import fusion, fusion_wan
from quantsparse_core.models.attention import AttentionCall, dense_attention
from quantsparse_core.models.wan import WanDiT, get_wan_preset, split_heads, wan_rope
from test_fused_small_ops import randomize
from kernel_marks import interpreted

GRID = (3, 2, 5)  # 30 video tokens


def _inputs(cfg, rng, b=2, rows=1):
    """x, e0 [B, rows, 6, C] (rows = GRID[0]: one modulation per frame, as Wan 2.2 TI2V), text, RoPE table."""
    n = GRID[0] * GRID[1] * GRID[2]
    x = torch.randn(b, n, cfg.dim, generator=rng)
    e0 = torch.randn(b, rows, 6, cfg.dim, generator=rng) * 0.3
    text = torch.randn(b, 7, cfg.dim, generator=rng)
    return x, e0, text, wan_rope(GRID, cfg.rope_axes, cfg.rope_theta, "cpu")


def _run_both(block, x, e0, text, table, ops, quantize_inputs=True):
    """(eager WanBlock output, fused output) for one block on the same inputs."""
    call = AttentionCall("double", 0, 1, 0, GRID)
    heads = block.self_attn.heads
    eager = block(x, e0, table, text, None, dense_attention, call)
    mods = (block.modulation.to(x.dtype).unsqueeze(0) + e0).unbind(2)  # six [B, R, C]
    fused = fusion_wan.wan_block_fused(
        fusion_wan.wan_view(block, ops, quantize_inputs), x, mods, table,
        cross=lambda h: block.cross_attn(h, text, None),
        attention=lambda q, k, v: dense_attention(split_heads(q, heads), split_heads(k, heads),
                                                  split_heads(v, heads), None, call))
    return eager, fused


@pytest.mark.parametrize("rows", [1, GRID[0]], ids=["one-timestep", "per-frame-timesteps"])
@pytest.mark.parametrize("chunk", ["0", "8", "25"], ids=["whole", "chunks-of-8", "chunks-of-25"])
def test_fused_wan_block_equals_eager_fp32(rng, monkeypatch, chunk, rows):
    """One timestep: chunks of 8 or 25 of the 30 tokens across both batch entries. Per frame (10 tokens a row):
    chunks of 8 split every frame, chunks of 25 take two whole frames together."""
    cfg = get_wan_preset("wan-test")
    model = randomize(WanDiT(cfg), rng).eval()
    x, e0, text, table = _inputs(cfg, rng, rows=rows)
    monkeypatch.setenv(fusion.CHUNK_TOKENS_ENV, chunk)
    with torch.no_grad(), dispatch.forced("torch"):
        eager, fused = _run_both(model.blocks[0], x, e0, text, table, fusion.small_ops(False))
    assert torch.isfinite(fused).all() and float(fused.abs().mean()) > 0.1
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)


def _frozen_w4a8_block(rng, same_clip: bool):
    """Block 0 of a random W4A8 wan-test model (smoothing off, as Calibrate writes Wan files), frozen; q/k/v
    clipping alike (an RTN checkpoint) or each its own (a calibrated one)."""
    from quantsparse_core.quant.linear import QuantLinear
    from quantsparse_core.quant.policy import quantize_model
    from quantsparse_core.models.wan_storage import wan_policy
    cfg = get_wan_preset("wan-test")
    model = randomize(WanDiT(cfg), rng).eval()
    quantize_model(model, wan_policy(model))
    clips = iter([0.9, 0.8, 0.85, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    with torch.no_grad():
        for mod in model.blocks[0].modules():
            if isinstance(mod, QuantLinear):
                mod.a_clip.fill_(0.9 if same_clip else next(clips))
                mod.freeze()
    return cfg, model.blocks[0]


@interpreted
@pytest.mark.parametrize("same_clip,rows,batch", [(True, 1, 1), (False, 1, 1), (True, GRID[0], 2)],
                         ids=["rtn-like", "calibrated-like", "rtn-like-per-frame-timesteps-batch-2"])
def test_producer_quantized_wan_block_equals_separate_quantization(rng, monkeypatch, same_clip, rows, batch):
    """W4A8 on the Triton path (interpreter, fp32): q/k/v, fc1 and fc2 take producer codes (one LayerNorm +
    quantization shared by q/k/v when their clips agree, one each when not), q/k go through the Wan q/k kernel,
    and the block output is the one the layers give quantizing their own inputs."""
    from quantsparse_kernels import producer_quant, wan_qk_norm_rope
    cfg, block = _frozen_w4a8_block(rng, same_clip)
    x, e0, text, table = _inputs(cfg, rng, b=batch, rows=rows)
    norms, qk = [], []
    real_norm, real_qk = producer_quant.norm_modulate_quant, wan_qk_norm_rope.wan_qk
    monkeypatch.setattr(producer_quant, "norm_modulate_quant", lambda *a, **k: norms.append(1) or real_norm(*a, **k))
    monkeypatch.setattr(wan_qk_norm_rope, "wan_qk", lambda *a, **k: qk.append(1) or real_qk(*a, **k))
    ops = fusion.small_ops(False)
    with torch.no_grad(), dispatch.forced("triton"):
        eager, separate = _run_both(block, x, e0, text, table, ops, quantize_inputs=False)
        assert not norms and len(qk) == 1
        _, fused = _run_both(block, x, e0, text, table, ops)
    assert len(norms) == (1 if same_clip else 3) + 1 and len(qk) == 2
    assert torch.isfinite(fused).all() and fused.abs().max() > 0
    torch.testing.assert_close(separate, eager, atol=1e-4, rtol=1e-4)  # the kernel q/k path: the model's math
    # As test_fused_small_ops: the producers' LayerNorm / GELU may move a rare code by one step (<~1e-2).
    assert float((fused - separate).norm() / separate.norm()) < 2e-2


@interpreted
def test_a_failing_kernel_is_left_for_pytorch_once(rng, monkeypatch, caplog):
    """A fused-path kernel that fails here (a Triton that cannot compile it) is said once and left for PyTorch:
    the block still gives the eager output; the caller's ValueError and device faults still raise."""
    from quantsparse_kernels import wan_qk_norm_rope
    cfg = get_wan_preset("wan-test")
    model = randomize(WanDiT(cfg), rng).eval()
    x, e0, text, table = _inputs(cfg, rng)
    monkeypatch.setattr(dispatch, "kernel_failures", {})
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")  # what a Triton compile failure looks like

    monkeypatch.setattr(wan_qk_norm_rope, "wan_qk", broken)
    with torch.no_grad(), dispatch.forced("triton"), pytest.raises(RuntimeError, match="PassManager"):
        _run_both(model.blocks[0], x, e0, text, table, fusion.small_ops(False))  # the tests' strict mode raises
    assert not dispatch.kernel_failures
    calls.clear()
    monkeypatch.delenv(dispatch.STRICT_ENV)  # what a user's run does
    with torch.no_grad(), dispatch.forced("triton"):
        for _ in range(2):
            eager, fused = _run_both(model.blocks[0], x, e0, text, table, fusion.small_ops(False))
            torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1 and "wan_qk_norm_rope" in dispatch.kernel_failures
    assert sum("wan_qk_norm_rope kernel failed" in r.getMessage() for r in caplog.records) == 1
    for error in (ValueError("bad tensors"), RuntimeError("CUDA error: an illegal memory access")):
        def failing():
            raise error
        with pytest.raises(type(error)):
            dispatch.guarded("other", failing, lambda: None, "-")

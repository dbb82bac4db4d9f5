"""The few-step schedule (SparseSettings.schedule): which schedule "auto" picks from the run's step count,
that each schedule does what it says step by step, that density 1 under it is dense attention, and the
override from the nodes' settings."""
import importlib.util
import math

import pytest
import torch

from quantsparse_core.dispatch import block_sparse_attention
from quantsparse_core.models.attention import AttentionCall, StepInfo
from quantsparse_core.sparse.ssar import FEW_STEP_MAX, SCHEDULES, SparseSettings, SSARAttention

GRID, TXT, BLOCK_ = (4, 4, 4), 8, 16
L = TXT + 64
B, H, D = 2, 2, 16


def qkv(rng):
    return [torch.randn(B, H, L, D, generator=rng) for _ in range(3)]


def call(step, num_steps, block_index=0):
    return AttentionCall("double", block_index, 1, TXT, GRID, StepInfo(step, torch.linspace(1, 0, num_steps + 1)))


def settings(**kw):
    base = dict(density=0.3, svd_rank=0, warmup_blocks=0, block=BLOCK_, n_rows=16, placement="exact")
    base.update(kw)
    return SparseSettings(**base)


def reference_attention(q, k, v):
    """Plain softmax attention in float64, [B, L, H*D]."""
    q, k, v = (t.double() for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = p @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


# ---- which schedule ---------------------------------------------------------------------------------
def test_auto_picks_few_step_for_short_runs_only():
    s = SparseSettings()
    assert s.schedule == "auto"
    assert s.resolved_schedule(4) == "few-step" and s.resolved_schedule(8) == "few-step"
    assert s.resolved_schedule(50) == "standard"
    assert s.resolved_schedule(FEW_STEP_MAX) == "few-step" and s.resolved_schedule(FEW_STEP_MAX + 1) == "standard"
    assert SparseSettings(few_step_max=3).resolved_schedule(4) == "standard"
    assert SparseSettings(few_step_max=0).resolved_schedule(1) == "standard"
    for n in (4, 50):  # an explicit schedule is kept at any length
        for name in SCHEDULES[1:]:
            assert SparseSettings(schedule=name).resolved_schedule(n) == name


def test_plans_step_by_step():
    assert SparseSettings().plan(4).kinds() == ["refresh", "reuse", "refresh", "reuse"]
    assert SparseSettings().plan(8).kinds() == ["refresh", "reuse"] * 4
    assert SparseSettings().plan(4).order == 1
    std = SparseSettings().plan(50)
    kinds = std.kinds()
    assert kinds[:5] == ["dense"] * 5 and kinds.count("refresh") == 9 and kinds.count("reuse") == 36
    assert [i for i, k in enumerate(kinds) if k == "refresh"] == list(range(5, 50, 5)) and std.order == 2
    # the standard schedule at 4 steps: its only refresh is step 0 (what few-step replaces)
    assert SparseSettings(schedule="standard").plan(4).kinds() == ["refresh", "reuse", "reuse", "reuse"]
    assert SparseSettings(schedule="sparse-only").plan(4).kinds() == ["dense", "sparse", "sparse", "sparse"]
    assert SparseSettings(schedule="few-step", order=0).plan(6).order == 0  # order 0 stays cache-free


def test_bad_schedule_settings():
    for kw in (dict(schedule="fast"), dict(few_step_max=-1), dict(few_step_max=2.5)):
        with pytest.raises(ValueError):
            SparseSettings(**kw)
    with pytest.raises(ValueError, match="auto, standard, few-step, sparse-only"):
        SparseSettings(schedule="fewstep")


# ---- what the schedules do -----------------------------------------------------------------------------
def test_few_step_refreshes_every_other_step_with_first_order_correction(rng):
    """Step 0 and 2: exact attention, new mask and residual D; steps 1 and 3: the block-sparse output over
    the last refresh's mask plus that refresh's D (first order), checked against a float64 reference."""
    fn = SSARAttention(settings(schedule="auto"))  # 4 steps: auto -> few-step
    d_last = None
    for step in range(4):
        x = qkv(rng)
        before = dict(fn.stats)
        out = fn(*x, None, call(step, 4))
        ref = reference_attention(*x)
        delta = {k: fn.stats[k] - before[k] for k in ("dense", "sparse", "refresh")}
        if step % 2 == 0:
            assert delta == dict(dense=B, sparse=0, refresh=B), step
            assert torch.allclose(out.double(), ref, atol=2e-6, rtol=0)
            mask = fn.block_mask("double", 0, B)
            d_last = ref - block_sparse_attention(*x, None, mask, TXT, GRID).double()
            assert torch.allclose(fn.cache("double", 0, B).double(), d_last, atol=2e-6, rtol=0)
        else:
            assert delta == dict(dense=0, sparse=B, refresh=0), step
            expect = block_sparse_attention(*x, None, mask, TXT, GRID).double() + d_last
            assert torch.allclose(out.double(), expect, atol=2e-6, rtol=0)
            assert (out.double() - ref).abs().max() > 1e-3  # really sparse, not dense
    assert fn.stats["mask_changed"] == 0  # first order: no second-order residual is ever formed


def test_sparse_only_remasks_every_step_without_cache(rng):
    fn = SSARAttention(settings(schedule="sparse-only"))
    masks = []
    for step in range(4):
        x = qkv(rng)
        out = fn(*x, None, call(step, 4))
        if step == 0:
            assert torch.allclose(out.double(), reference_attention(*x), atol=2e-6, rtol=0)
            assert fn.block_mask("double", 0, B) is None
            continue
        mask = fn.block_mask("double", 0, B)
        masks.append(mask)
        assert torch.equal(out, block_sparse_attention(*x, None, mask, TXT, GRID))
    assert len({id(m) for m in masks}) == 3  # a fresh mask each step
    assert fn.stats["dense"] == B and fn.stats["sparse"] == 3 * B and fn.stats["refresh"] == 0
    assert fn._store is None and fn.cache("double", 0, B) is None  # no residual memory at all


def test_attention_cost_counts_refresh_pass_and_mask_selection(rng):
    fn = SSARAttention(settings(schedule="few-step", n_rows=8))
    for step in range(4):
        fn(*qkv(rng), None, call(step, 4))
    d = fn.block_mask("double", 0, B).density()
    # masks of both refreshes have the same band density; each selection: 8 rows of L, (1 + d) passes
    profile = 2 * (8 / L) * (1 + d)
    assert fn.effective_density() == pytest.approx((2 + 2 * d) / 4, abs=1e-12)
    assert fn.attention_cost() == pytest.approx((2 + 2 * d + 2 * d + profile) / 4, abs=1e-12)
    merged = SSARAttention(settings(schedule="few-step", n_rows=8, merged_refresh=True))
    for step in range(2):
        merged(*qkv(rng), None, call(step, 4))
    dm = merged.block_mask("double", 0, B).density()
    assert merged.attention_cost() == pytest.approx((1 + dm + (8 / L) * (1 + dm)) / 2, abs=1e-12)


@pytest.mark.parametrize("schedule", ["few-step", "sparse-only", "auto"])
def test_density_one_is_dense_attention(rng, schedule):
    fn = SSARAttention(settings(density=1.0, schedule=schedule))
    for step in range(6):
        x = qkv(rng)
        out = fn(*x, None, call(step, 6))
        assert torch.allclose(out.double(), reference_attention(*x), atol=2e-6, rtol=0), step
    assert fn.stats["sparse"] > 0  # the sparse path ran (with the all-keep mask)
    assert fn.attention_cost() == pytest.approx(1.0 if schedule == "sparse-only" else 1.5, abs=1e-12)


def test_few_step_on_the_model_sampler(rng):
    """Through HunyuanVideoDiT + sample_euler at 4 steps: block 0 dense, then per block and batch entry
    refreshes at steps 0 and 2 and reuse at 1 and 3; density 1 gives the dense run."""
    from quantsparse_core.models import HunyuanVideoDiT, get_preset
    from quantsparse_core.models.sampler import flow_sigmas, sample_euler
    cfg = get_preset("test")
    model = HunyuanVideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=rng)
    ctx, y = torch.randn(1, 6, cfg.context_in_dim, generator=rng), torch.randn(1, 768, generator=rng)
    sig = flow_sigmas(4)
    dense = sample_euler(model, x, ctx, y, sig)
    kw = dict(block=8, n_rows=8, warmup_blocks=1, placement="exact")
    with model.attention(SSARAttention(SparseSettings(density=1.0, **kw))):
        assert torch.allclose(sample_euler(model, x, ctx, y, sig), dense, atol=1e-5, rtol=0)
    fn = SSARAttention(SparseSettings(density=0.4, **kw))
    with model.attention(fn):
        out = sample_euler(model, x, ctx, y, sig)
    blocks = cfg.depth_double + cfg.depth_single
    assert fn.plan(4).schedule == "few-step"
    assert fn.stats["dense"] == 4 + 2 * (blocks - 1)   # warm-up block every step + 2 refreshes of the others
    assert fn.stats["refresh"] == 2 * (blocks - 1) and fn.stats["sparse"] == 2 * (blocks - 1)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)


# ---- the nodes' override ----------------------------------------------------------------------------------
def _sparse_nodes():
    from test_comfy_nodes import load_pack  # registers the pack as ComfyUI does (skips without ComfyUI)
    load_pack()
    return importlib.import_module("comfyui_quantsparse_under_test.nodes.sparse_nodes")


def test_node_schedule_override():
    nodes = _sparse_nodes()
    base = dict(density=0.15, refresh_interval=5, svd_rank=16, warmup_steps=-1, warmup_blocks=1, cache_placement="auto")
    assert nodes.sparse_settings(**base).resolved_schedule(4) == "few-step"  # an older prompt without the input
    assert nodes.sparse_settings(**base).resolved_schedule(50) == "standard"
    for name in ("standard", "few-step", "sparse-only"):
        s = nodes.sparse_settings(**base, schedule=name)
        assert s.resolved_schedule(4) == name and s.resolved_schedule(50) == name
    assert nodes.sparse_settings(**base, schedule="standard").plan(4).kinds() == ["refresh", "reuse", "reuse", "reuse"]
    with pytest.raises(ValueError, match="schedule"):
        nodes.sparse_settings(**base, schedule="turbo")
    for cls in (nodes.SparseSampler, nodes.SparseAttentionPatch):
        inputs = {i.id: i for i in cls.define_schema().inputs}
        widget = inputs["schedule"]
        assert widget.options == list(SCHEDULES) and widget.default == "auto" and widget.optional
        assert "few-step" in widget.tooltip and str(FEW_STEP_MAX) in widget.tooltip
        assert list(inputs)[-1] == "schedule"  # last: saved workflows' widget order is unchanged

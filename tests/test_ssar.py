"""SSAR attention (METHOD.md §4) and SSAR cache placement, on small random shapes."""
import pytest
import torch

from quantsparse_core.models.attention import AttentionCall, StepInfo, dense_attention
from quantsparse_core.dispatch import block_sparse_attention
from quantsparse_core.sparse.cache import CacheStore, cache_bytes, choose_placement, placement_table
from quantsparse_core.sparse.low_rank import svd_truncate, truncated_factors
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

GRID, TXT, BLOCK_ = (4, 4, 4), 8, 16
L = TXT + 64
B, H, D = 2, 2, 16


def qkv(rng, batch=B):
    return [torch.randn(batch, H, L, D, generator=rng) for _ in range(3)]


def framewise_qkv(rng):
    """q, k similar within a frame, so every head clearly prefers the spatial mask at every step."""
    frame = torch.randn(B, H, GRID[0], D, generator=rng).repeat_interleave(16, dim=2) * 2
    q, k, v = (torch.randn(B, H, L, D, generator=rng) * 0.5 for _ in range(3))
    q[:, :, TXT:] += frame
    k[:, :, TXT:] += frame
    return [q, k, v]


def call(step, block_type="double", block_index=1, num_blocks=2, num_steps=10):
    return AttentionCall(block_type, block_index, num_blocks, TXT, GRID, StepInfo(step, torch.linspace(1, 0, num_steps + 1)))


def settings(**kw):
    base = dict(density=0.3, tau=3, svd_rank=0, order=2, warmup_steps=0, warmup_blocks=0, block=BLOCK_,
                n_rows=16, placement="exact")
    base.update(kw)
    return SparseSettings(**base)


def sparse_of(fn, x, c):
    return block_sparse_attention(*x, None, fn.block_mask(c.block_type, c.block_index, x[0].shape[0]), TXT, GRID)


def test_refresh_step_is_exact_full_attention(rng):
    fn = SSARAttention(settings(tau=3))
    for step in range(7):
        x = qkv(rng)
        out = fn(*x, None, call(step))
        if step % 3 == 0:
            assert torch.allclose(out, dense_attention(*x, None, call(step)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [1, 2])
def test_constant_inputs_reproduce_full_attention(rng, order):
    fn = SSARAttention(settings(order=order, tau=3))
    x = qkv(rng)
    full = dense_attention(*x, None, call(0))
    for step in range(8):
        out = fn(*x, None, call(step))
        assert torch.allclose(out, full, atol=1e-5, rtol=0), step
    assert (sparse_of(fn, x, call(0)) - full).abs().max() > 1e-3  # the cache did real work


def test_order0_between_refreshes_is_block_sparse(rng):
    fn = SSARAttention(settings(order=0, tau=3))
    fn(*qkv(rng), None, call(0))
    for step in (1, 2):
        x = qkv(rng)
        assert torch.equal(fn(*x, None, call(step)), sparse_of(fn, x, call(step)))


def test_density_one_is_dense_everywhere(rng):
    fn = SSARAttention(settings(density=1.0, tau=2))
    for step in range(5):
        x = qkv(rng)
        assert torch.allclose(fn(*x, None, call(step)), dense_attention(*x, None, call(step)), atol=1e-5, rtol=0)


def test_warmup_steps_and_blocks_are_dense(rng):
    fn = SSARAttention(settings(warmup_steps=None, warmup_blocks=3, tau=5))  # 20 steps -> 2 warm-up steps
    for step in range(4):
        for kind, n in (("double", 2), ("single", 3)):
            for i in range(n):
                c = call(step, kind, i, n, num_steps=20)
                x = qkv(rng)
                out = fn(*x, None, c)
                dense = dense_attention(*x, None, c)
                warm = step < 2 or (kind == "double" or i == 0)  # positions 0, 1 (double), 2 (single 0)
                if warm:
                    assert torch.equal(out, dense)
                    assert fn.block_mask(kind, i, B) is None
                elif step == 3:  # not a refresh step: sparse + stale cache on fresh inputs
                    assert not torch.allclose(out, dense, atol=1e-4)
    assert fn.block_mask("single", 1, B) is not None


def test_new_run_does_not_reuse_old_cache(rng):
    s = settings(order=2, svd_rank=0, tau=5)
    fn = SSARAttention(s)
    run_a = [qkv(rng) for _ in range(3)]
    run_b = [qkv(rng) for _ in range(2)]
    for step, x in enumerate(run_a):
        fn(*x, None, call(step))
    d_a = fn.cache("double", 1, B)
    outs = [fn(*x, None, call(step)) for step, x in enumerate(run_b)]  # step 0 again: automatic reset
    fresh = SSARAttention(s)
    ref = [fresh(*x, None, call(step)) for step, x in enumerate(run_b)]
    assert all(torch.equal(a, r) for a, r in zip(outs, ref))
    # A stale D_prev from run A would have added D_B0 - D_A to the output.
    d_b = fn.cache("double", 1, B)
    assert (d_b - d_a).abs().max() > 1e-3
    fn.reset()
    assert fn.block_mask("double", 1, B) is None and fn.cache("double", 1, B) is None
    assert fn.effective_density() == 1.0


@pytest.mark.parametrize("rank,host_eigh", [(0, False), (3, False), (3, True)])
def test_cache_is_d_plus_truncated_d2(rng, rank, host_eigh):
    """host_eigh: the factors' eigendecomposition on the host thread (as on CUDA), D2 kept in the
    cache until cache() or the next call collects it: the same C."""
    fn = SSARAttention(settings(order=2, svd_rank=rank, tau=2, host_eigh=host_eigh))
    # q, k fixed and v only rescaled: every head's sampled mask errors scale alike, so both refreshes
    # choose the same masks (a mask change falls back to first order, tested separately), while D
    # changes with the scale, so D2 is not zero
    q, k, v = framewise_qkv(rng)
    xs = [[q, k, v * c] for c in (1.0, 1.3, 1.7, 2.2)]
    c = [call(i) for i in range(4)]
    fn(*xs[0], None, c[0])
    d0 = dense_attention(*xs[0], None, c[0]) - sparse_of(fn, xs[0], c[0])
    assert torch.allclose(fn.cache("double", 1, B), d0, atol=1e-6, rtol=0)  # first refresh: first order only
    fn(*xs[1], None, c[1])
    fn(*xs[2], None, c[2])
    d1 = dense_attention(*xs[2], None, c[2]) - sparse_of(fn, xs[2], c[2])
    d2 = (d1 - d0).view(B, L, H, D).transpose(1, 2)
    if rank:
        u, sv, vh = torch.linalg.svd(d2, full_matrices=False)
        d2 = u[..., :rank] @ torch.diag_embed(sv[..., :rank]) @ vh[..., :rank, :]
    expected = d1 + d2.transpose(1, 2).reshape(B, L, H * D)
    assert fn.stats["mask_changed"] == 0
    assert bool(fn._pending) == host_eigh  # collected by cache() below
    assert torch.allclose(fn.cache("double", 1, B), expected, atol=1e-5, rtol=0)
    out = fn(*xs[3], None, c[3])
    assert torch.allclose(out, sparse_of(fn, xs[3], c[3]) + expected, atol=1e-5, rtol=0)


def test_host_eigh_matches_inline_over_a_run(rng):
    """Deferred factors collected at later calls, superseded by the next refresh (tau 2 and 1), or
    left pending across a reset: every output and the final cache equal the inline computation."""
    for tau in (2, 1):
        xs = [[x * (1 + 0.2 * i) if j == 2 else x for j, x in enumerate(framewise_qkv(rng))] for i in range(7)]
        runs = {}
        for host in (False, True):
            fn = SSARAttention(settings(order=2, svd_rank=2, tau=tau, host_eigh=host))
            outs = [fn(*x, None, call(i, block_index=bi)) for i, x in enumerate(xs) for bi in (0, 1)]
            runs[host] = (outs, fn.cache("double", 1, B))
        for a, b in zip(runs[False][0], runs[True][0]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert torch.allclose(runs[False][1], runs[True][1], atol=1e-5, rtol=0)


def test_host_eigh_with_an_int8_cache_is_within_its_rounding(rng):
    """With the gpu-int8 placement the pending D2 is stored as int8 too: C differs from the inline
    one by at most the rounding of D2 (half a step of its row scale, through an orthogonal projection)."""
    xs = [[q, k, v * c] for q, k, v in [framewise_qkv(rng)] for c in (1.0, 1.4, 1.9)]
    caches = {}
    for host in (False, True):
        fn = SSARAttention(settings(order=2, svd_rank=3, tau=2, placement="gpu-int8", host_eigh=host))
        for i, x in enumerate(xs):
            fn(*x, None, call(i))
        caches[host] = fn.cache("double", 1, B)
    d2_step = caches[False].abs().amax(-1).max() / 127  # bound on the row scale of D2 (|D2| <= 2 max|C|)
    assert float((caches[True] - caches[False]).abs().max()) <= 2 * float(d2_step) * (D ** 0.5)


def test_batch_sizes_keep_separate_state(rng):
    """cond+uncond batched (B=2) and a separate B=1 call at the same block do not share a cache."""
    fn = SSARAttention(settings(order=1))
    x2, x1 = qkv(rng, 2), qkv(rng, 1)
    fn(*x2, None, call(0))
    fn(*x1, None, call(0))
    d1 = dense_attention(*x1, None, call(0)) - sparse_of(fn, x1, call(0))
    assert torch.allclose(fn.cache("double", 1, 1), d1, atol=1e-6, rtol=0)
    y1 = qkv(rng, 1)
    assert torch.allclose(fn(*y1, None, call(1)), sparse_of(fn, y1, call(1)) + d1, atol=1e-6, rtol=0)


def positionwise_qkv(rng):
    """q, k similar at one spatial position across frames, so heads prefer the temporal mask."""
    pos = torch.randn(B, H, 1, GRID[1] * GRID[2], D, generator=rng).expand(-1, -1, GRID[0], -1, -1) * 2
    q, k, v = (torch.randn(B, H, L, D, generator=rng) * 0.5 for _ in range(3))
    q[:, :, TXT:] += pos.reshape(B, H, -1, D)
    k[:, :, TXT:] += pos.reshape(B, H, -1, D)
    return [q, k, v]


def test_mask_change_falls_back_to_first_order(rng):
    """D - D_prev across a mask change measures the mask change, so the cache stays first order."""
    fn = SSARAttention(settings(order=2, svd_rank=0, tau=1))
    kinds = []
    for step in range(3):
        x = (framewise_qkv if step % 2 == 0 else positionwise_qkv)(rng)
        fn(*x, None, call(step))
        kinds.append(fn.block_mask("double", 1, B).kinds)
        d = dense_attention(*x, None, call(step)) - sparse_of(fn, x, call(step))
        assert torch.allclose(fn.cache("double", 1, B), d, atol=1e-6, rtol=0)
    assert kinds == [["spatial"] * H, ["temporal"] * H, ["spatial"] * H]
    assert fn.stats["mask_changed"] == 2 * B


def test_effective_density_counts(rng):
    fn = SSARAttention(settings(tau=2, order=1))
    for step in range(4):
        fn(*qkv(rng), None, call(step))
    d = fn.block_mask("double", 1, B).density()
    assert d < 1.0
    assert abs(fn.effective_density() - (2 + 2 * d) / 4) < 1e-9


def test_refiner_and_no_step_are_dense(rng):
    fn = SSARAttention(settings())
    x = qkv(rng)
    for c in (AttentionCall("refiner", 0, 2, TXT, GRID, StepInfo(3, torch.ones(5))),
              AttentionCall("double", 1, 2, TXT, GRID, None)):
        assert torch.equal(fn(*x, None, c), dense_attention(*x, None, c))


def test_bad_settings():
    for kw in (dict(density=0), dict(density=1.5), dict(tau=0), dict(order=3), dict(placement="disk")):
        with pytest.raises(ValueError):
            SparseSettings(**kw)
    fn = SSARAttention(settings(svd_rank=D + 1))
    with pytest.raises(ValueError, match="head_dim"):
        fn(*[torch.ones(1, H, L, D)] * 3, None, call(0))


# ---- placement ------------------------------------------------------------------------------------
def test_bf16_720p_bytes_match_method():
    per_layer = cache_bytes("gpu-bf16", 119_056, 3072, 1)[0]
    assert abs(per_layer - 119_056 * 3072 * 2) <= 0.01 * per_layer
    rows = {(r["resolution"], r["policy"]): r for r in placement_table()}
    assert rows[("720p", "gpu-bf16")]["tokens"] == 119_056 and rows[("544p", "gpu-bf16")]["tokens"] == 67_576
    assert abs(rows[("720p", "gpu-bf16")]["per_layer_gb"] - 0.73) < 0.01
    assert abs(rows[("720p", "gpu-bf16")]["total_gb"] - 44) < 0.5
    assert rows[("720p", "cpu-pinned")]["device_bytes"] == 0


def test_choose_placement_never_exceeds_budget():
    args = dict(tokens=67_576, hidden=3072, layers=60, batch=2, rank=16, heads=24)
    seen = set()
    for e in range(20, 40):
        for budget, host_budget in [(m * 2 ** e, hb) for m in (1, 3) for hb in (0, 2 ** 36)]:
            try:
                p = choose_placement(budget_bytes=budget, host_budget_bytes=host_budget, **args)
            except ValueError as err:
                assert "not enough memory" in str(err)
                continue
            seen.add(p)
            dev, host = cache_bytes(p, args["tokens"], args["hidden"], args["layers"], args["batch"],
                                    args["rank"], args["heads"])
            assert dev <= budget and host <= host_budget
    assert {"gpu-bf16", "gpu-int8", "cpu-pinned", "low-rank"} <= seen
    with pytest.raises(ValueError, match="not enough memory"):
        choose_placement(budget_bytes=1000, host_budget_bytes=0, **args)


def test_int8_round_trip_bounded(rng):
    x = torch.randn(2, 40, 32, generator=rng) * torch.rand(2, 40, 1, generator=rng) * 10
    store = CacheStore("gpu-int8")
    store.put("k", x, heads=2)
    err = (store.get("k", "cpu") - x).abs()
    assert (err <= x.abs().amax(-1, keepdim=True) / 254 * 1.0001 + 1e-12).all()


def test_low_rank_and_cpu_stores(rng):
    x = torch.randn(2, 40, 32, generator=rng)
    store = CacheStore("low-rank", rank=4)
    store.put("k", x, heads=2)
    got = store.get("k", "cpu")
    ref = svd_truncate(x, 2, 4)
    assert torch.allclose(got, ref, atol=0.05 * float(ref.abs().max()), rtol=0)
    per_head = got.view(2, 40, 2, 16).transpose(1, 2)
    assert int(torch.linalg.matrix_rank(per_head.double(), rtol=1e-3).max()) <= 4
    us, vh = truncated_factors(x, 2, 4)
    assert us.shape == (2, 2, 40, 4) and vh.shape == (2, 2, 4, 16)
    pinned = CacheStore("cpu-pinned")
    pinned.put("k", x, heads=2)
    assert torch.equal(pinned.get("k", "cpu"), x.to(torch.bfloat16).float())
    assert pinned.nbytes() == x.numel() * 2


def test_plugs_into_the_model_sampler(rng):
    """Through HunyuanVideoDiT + sample_euler: density 1 is the dense run; a sparse run is
    repeatable (automatic reset at step 0) and cheaper than dense."""
    from quantsparse_core.models import HunyuanVideoDiT, get_preset
    from quantsparse_core.models.sampler import flow_sigmas, sample_euler
    cfg = get_preset("test")
    model = HunyuanVideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.05)
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=rng)
    ctx, y = torch.randn(1, 6, cfg.context_in_dim, generator=rng), torch.randn(1, 768, generator=rng)
    sig = flow_sigmas(6)
    dense = sample_euler(model, x, ctx, y, sig)
    kw = dict(tau=2, svd_rank=2, warmup_steps=1, block=8, n_rows=8, placement="gpu-bf16")
    with model.attention(SSARAttention(SparseSettings(density=1.0, **kw))):
        assert torch.allclose(sample_euler(model, x, ctx, y, sig), dense, atol=1e-4, rtol=0)
    fn = SSARAttention(SparseSettings(density=0.4, **kw))
    with model.attention(fn):
        first = sample_euler(model, x, ctx, y, sig)
        assert fn.effective_density() < 1.0
        assert torch.equal(sample_euler(model, x, ctx, y, sig), first)
    assert torch.isfinite(first).all()


def test_auto_placement_follows_the_budget(rng):
    """2 blocks x batch 2 x (D and full D2, rank 0): bf16 needs 36,864 B, int8 20,736 B."""
    args = (72, H * D, 2, None, 2, 16, H)
    assert cache_bytes("gpu-bf16", *args[:3], *args[4:], tensors=2)[0] == 36_864
    for budget, policy in ((40_000, "gpu-bf16"), (25_000, "gpu-int8")):
        fn = SSARAttention(settings(placement="auto", budget_bytes=budget, host_budget_bytes=0))
        fn(*qkv(rng), None, call(0))
        assert fn.placement == policy
    fn = SSARAttention(settings(placement="auto", budget_bytes=100, host_budget_bytes=0))
    with pytest.raises(ValueError, match="not enough memory"):
        fn(*qkv(rng), None, call(0))


def test_host_eigh_under_inference_mode(rng):
    """ComfyUI runs nodes under torch.inference_mode, which is thread-local: the worker thread that
    decomposes the Gram matrices runs outside it, on inference tensors. Same numbers as inline."""
    xs = [[x * (1 + 0.3 * i) if j == 2 else x for j, x in enumerate(framewise_qkv(rng))] for i in range(4)]
    outs = {}
    for host in (False, True):
        fn = SSARAttention(settings(order=2, svd_rank=2, tau=2, host_eigh=host))
        with torch.inference_mode():
            outs[host] = [fn(*x, None, call(i)) for i, x in enumerate(xs)] + [fn.cache("double", 1, B)]
    for a, b in zip(outs[False], outs[True]):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_host_eigh_failure_is_reported_and_leaves_a_consistent_state(rng, monkeypatch):
    """A decomposition that fails on the worker surfaces as a clear error at the block that needs it;
    the block falls back to first order (its D2 dropped) and the next calls run."""
    import quantsparse_core.sparse.host_eigh as host_eigh

    def broken(gram, rank):
        raise torch.linalg.LinAlgError("failed to converge (simulated)")

    xs = [[x * (1 + 0.2 * i) if j == 2 else x for j, x in enumerate(framewise_qkv(rng))] for i in range(5)]
    fn = SSARAttention(settings(order=2, svd_rank=2, tau=2, host_eigh=True))
    fn(*xs[0], None, call(0))
    monkeypatch.setattr(host_eigh, "top_vectors", broken)
    fn(*xs[1], None, call(1))
    fn(*xs[2], None, call(2))                       # second refresh: D2 queued, the job fails
    key = ("double", 1, B)
    with pytest.raises(RuntimeError, match="host thread.*host_eigh=False"):
        fn(*xs[3], None, call(3))
    assert fn._states[key].corr is None and not fn._pending
    first_order = fn.cache("double", 1, B)
    out = fn(*xs[3], None, call(3))
    assert torch.allclose(out, sparse_of(fn, xs[3], call(3)) + first_order, atol=1e-5, rtol=0)


def test_low_rank_placement_truncates_inline(rng, monkeypatch):
    """The low-rank placement truncates whatever it stores on the calling thread, so deferring D2's
    factors would add work there: SSAR computes them inline with that placement. The mask is held to the
    first refresh's (SVG's profile compares outputs, so the scaled v could flip a head's kind on some draws,
    and a changed mask rightly drops D2)."""
    xs = [[x * (1 + 0.2 * i) if j == 2 else x for j, x in enumerate(framewise_qkv(rng))] for i in range(3)]
    fn = SSARAttention(settings(order=2, svd_rank=2, tau=1, host_eigh=True, placement="low-rank", placement_rank=4))
    first, new_mask = {}, fn._new_mask
    monkeypatch.setattr(fn, "_new_mask", lambda q, k, v, mask, c: first.setdefault(
        (c.block_type, c.block_index), new_mask(q, k, v, mask, c)))
    for i, x in enumerate(xs):
        fn(*x, None, call(i))
        assert not fn._pending
    assert fn._states[("double", 1, B)].corr == "factors"

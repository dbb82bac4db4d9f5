"""cpu-pinned prefetch returns exactly what get() would, and never a stale value."""
import pytest
import torch

from quantsparse_core.sparse.cache import CacheStore


def _check(device, rng):
    store = CacheStore("cpu-pinned")
    a = torch.randn(1, 37, 64, generator=rng).to(device)
    b = torch.randn(1, 37, 64, generator=rng).to(device)
    store.put("k", a, heads=2)
    plain = store.get("k", device)
    store.prefetch("k", device)
    torch.testing.assert_close(store.get("k", device), plain, rtol=0, atol=0)
    torch.testing.assert_close(plain, a.to(torch.bfloat16).float(), rtol=0, atol=0)
    store.prefetch("k", device)
    store.put("k", b, heads=2)                      # overwritten after the prefetch started
    torch.testing.assert_close(store.get("k", device), b.to(torch.bfloat16).float(), rtol=0, atol=0)
    store.prefetch("missing", device)               # unknown keys are ignored
    store.prefetch("k", device)
    store.drop("k")
    assert "k" not in store and not store._ready


def test_prefetch_is_exact_on_cpu(rng):
    _check("cpu", rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_prefetch_is_exact_on_cuda(rng):
    _check("cuda", rng)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_ssar_with_prefetched_cpu_cache_equals_gpu_cache(rng):
    """Over several blocks and steps, the cpu-pinned placement (with prefetch) gives exactly what
    the bf16 GPU placement gives: both round the cache to bf16, only where it lives differs."""
    from quantsparse_core.models.attention import AttentionCall, StepInfo
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

    grid, txt = (4, 8, 8), 8
    length = txt + 256
    base = dict(density=0.3, tau=3, svd_rank=4, order=2, warmup_steps=0, warmup_blocks=0, block=32, n_rows=16)
    outs = {}
    for placement in ("gpu-bf16", "cpu-pinned"):
        fn = SSARAttention(SparseSettings(placement=placement, **base))
        g = torch.Generator().manual_seed(1234)
        got = []
        for step in range(7):
            for block in range(3):
                q, k, v = (torch.randn(1, 2, length, 64, generator=g).cuda() for _ in range(3))
                c = AttentionCall("double", block, 3, txt, grid, StepInfo(step, torch.linspace(1, 0, 11)))
                got.append(fn(q, k, v, None, c))
        outs[placement] = torch.stack(got)
    torch.testing.assert_close(outs["cpu-pinned"], outs["gpu-bf16"], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_placement_keeps_working_memory_free(rng, monkeypatch):
    """'auto' budgets free memory minus what the step itself still needs: with only that much free,
    no device placement fits and the cache goes to host memory or low rank."""
    from quantsparse_core.models.attention import AttentionCall, StepInfo
    from quantsparse_core.sparse.cache import working_bytes
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

    grid, txt, heads, d = (4, 8, 8), 8, 2, 64
    length = txt + 256
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (working_bytes(1, length, heads * d) + 1000, 80 * 2**30))
    fn = SSARAttention(SparseSettings(placement="auto", density=0.3, tau=2, warmup_steps=0, warmup_blocks=0,
                                      block=32, n_rows=16, layers=1))
    q, k, v = (torch.randn(1, heads, length, d, generator=rng).cuda() for _ in range(3))
    fn(q, k, v, None, AttentionCall("double", 0, 1, txt, grid, StepInfo(0, torch.linspace(1, 0, 5))))
    assert fn.placement in ("cpu-pinned", "low-rank")

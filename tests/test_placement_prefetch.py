"""cpu-pinned prefetch returns exactly what get() would, and never a stale value."""
import pytest
import torch

from quantsparse_core.sparse.placement import CacheStore


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

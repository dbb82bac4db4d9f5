"""The cpu-pinned cache's host memory (quantsparse_core/sparse/host_slabs.py): exact round trips across slab
boundaries, host use = the data (not PyTorch's power-of-two rounding), in-place rewrites, reuse of dropped
runs. Slabs are made tiny (power-of-two bytes) so entries span several; pinning needs CUDA and is off here,
the GPU run of tests/test_placement_prefetch.py covers the page-locked path."""
import pytest
import torch

from quantsparse_core.sparse.cache import CacheStore
from quantsparse_core.sparse.host_slabs import ALIGN, HostEntry, HostSlabs


@pytest.mark.parametrize("shape", [(1, 37, 64), (2, 300, 96), (3, 5)])
def test_entry_round_trip_across_slabs(rng, shape):
    slabs = HostSlabs(pin=False, slab_bytes=4096)
    x = torch.randn(shape, generator=rng).to(torch.bfloat16)
    e = HostEntry(slabs, x.shape, x.dtype)
    e.write(x)
    assert sum(p.numel() for p in e.pieces) == x.numel() * 2
    assert len(e.pieces) == -(-x.numel() * 2 // 4096)   # starts on a slab boundary: ceil(bytes / slab) pieces
    assert torch.equal(e.read("cpu"), x)
    with pytest.raises(ValueError, match="cannot take"):
        e.write(torch.randn(4, 4, generator=rng).to(torch.bfloat16))


def test_slabs_power_of_two_and_reuse(rng):
    with pytest.raises(ValueError, match="power of two"):
        HostSlabs(pin=False, slab_bytes=3000)
    with pytest.raises(ValueError, match="at least"):
        HostSlabs(pin=False, slab_bytes=1024)   # smaller than an entry's alignment
    slabs = HostSlabs(pin=False, slab_bytes=1 << 16)
    runs = [slabs.take(10_000) for _ in range(5)]
    need = 4 * -(-10_000 // ALIGN) * ALIGN + 10_000     # aligned starts
    assert slabs.reserved_bytes() == -(-need // (1 << 16)) * (1 << 16)
    before = slabs.reserved_bytes()
    slabs.give_back(runs[2])
    again = slabs.take(10_000)
    assert [p.data_ptr() for p in again] == [p.data_ptr() for p in runs[2]]  # the freed run, not new memory
    assert slabs.reserved_bytes() == before


def test_store_rewrites_in_place_and_counts_exact_bytes(rng):
    """A refresh writes each block's residual again: same bytes, no new host memory. The store holds the data
    plus less than one slab, where torch's pinned allocator would round each 0.73 GB entry to 1 GiB."""
    store = CacheStore("cpu-pinned")
    store._slabs = HostSlabs(pin=False, slab_bytes=1 << 14)
    xs = {k: torch.randn(1, 123, 48, generator=rng) for k in range(6)}
    for k, x in xs.items():
        store.put(k, x, heads=2)
    data = 6 * 123 * 48 * 2
    assert store.nbytes() == data
    assert data <= store.host_reserved_bytes() < data + 6 * ALIGN + (1 << 14)
    ptrs = {k: store._data[k][1].pieces[0].data_ptr() for k in xs}
    reserved = store.host_reserved_bytes()
    for k in xs:                                      # the next refresh
        xs[k] = torch.randn(1, 123, 48, generator=rng)
        store.put(k, xs[k], heads=2)
    assert store.host_reserved_bytes() == reserved
    assert {k: store._data[k][1].pieces[0].data_ptr() for k in xs} == ptrs
    for k, x in xs.items():
        assert torch.equal(store.get(k, "cpu"), x.to(torch.bfloat16).float())
    store.drop(3)                                     # its bytes serve the next entry of that size
    store.put("new", torch.randn(1, 123, 48, generator=rng), heads=2)
    assert store.host_reserved_bytes() == reserved and store._data["new"][1].pieces[0].data_ptr() == ptrs[3]
    store.put(0, torch.randn(1, 50, 48, generator=rng), heads=2)   # another size: a new run, the old one freed
    assert store.get(0, "cpu").shape == (1, 50, 48)


def test_store_factors_on_the_host(rng):
    store = CacheStore("cpu-pinned")
    us, vh = torch.randn(1, 2, 40, 4, generator=rng), torch.randn(1, 2, 4, 16, generator=rng)
    store.put_factors("c", us, vh)
    got_us, got_vh = store.get_factors("c", "cpu")
    assert torch.equal(got_us, us.to(torch.bfloat16).float()) and torch.equal(got_vh, vh.to(torch.bfloat16).float())
    assert store.nbytes() == (us.numel() + vh.numel()) * 2
    store.put_factors("c", us * 2, vh * 3)              # rewritten in place
    got_us, got_vh = store.get_factors("c", "cpu")
    assert torch.equal(got_us, (us * 2).to(torch.bfloat16).float()) and torch.equal(got_vh, (vh * 3).to(torch.bfloat16).float())


def test_pinnable_host_bytes(monkeypatch, tmp_path):
    from quantsparse_core import hostmem
    # PyTorch's pinned-cache statistics, both schemas: <= 2.9 reserved/allocated, newer allocated/active
    assert hostmem.cached_from_stats({"reserved_bytes.current": 5 << 30, "allocated_bytes.current": 2 << 30}) == 3 << 30
    assert hostmem.cached_from_stats({"allocated_bytes.current": 5 << 30, "active_bytes.current": 1 << 30}) == 4 << 30
    assert hostmem.cached_from_stats({}) == 0
    # a container's cgroup limit caps what is available (v2, v1; "max" / a huge v1 number: no limit)
    (tmp_path / "memory.max").write_text("17179869184\n")
    (tmp_path / "memory.current").write_text(str(6 << 30))
    assert hostmem._cgroup_room(str(tmp_path)) == 10 << 30
    (tmp_path / "memory.max").write_text("max\n")
    assert hostmem._cgroup_room(str(tmp_path)) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(8 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(3 << 30))
    assert hostmem._cgroup_room(str(tmp_path / "v1")) == 5 << 30
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 62))
    assert hostmem._cgroup_room(str(tmp_path / "v1")) is None
    monkeypatch.setattr(hostmem, "_cgroup_room", lambda: 3 << 30)
    monkeypatch.setattr(hostmem, "_meminfo_available", lambda: 30 << 30)
    assert hostmem.available_host_memory() == 3 << 30
    monkeypatch.setattr(hostmem, "available_host_memory", lambda: 30 << 30)
    monkeypatch.setattr(hostmem, "cached_pinned_bytes", lambda: 2 << 30)
    assert hostmem.pinnable_host_bytes() == (30 + 2 - 4) << 30
    monkeypatch.setattr(hostmem, "available_host_memory", lambda: 1 << 30)
    assert hostmem.pinnable_host_bytes() == 0
    monkeypatch.setattr(hostmem, "available_host_memory", lambda: None)
    assert hostmem.pinnable_host_bytes() is None


@pytest.mark.parametrize("host_mb,want", [(64, "cpu-pinned"), (0.05, "low-rank")])
def test_auto_placement_goes_low_rank_when_the_host_cannot_hold_the_cache(rng, caplog, host_mb, want):
    """No device room: the residuals go to the host if it can hold them (4 blocks x 264 tokens x 128 x 2 B
    = 0.27 MB), else low-rank; the choice is logged."""
    import logging

    from quantsparse_core.models.attention import AttentionCall, StepInfo
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

    fn = SSARAttention(SparseSettings(density=0.3, tau=2, svd_rank=0, order=1, warmup_steps=0, warmup_blocks=0,
                                      block=32, n_rows=16, budget_bytes=100_000,  # low-rank fits, int8 not
                                      host_budget_bytes=int(host_mb * 1e6)))
    grid, txt = (4, 8, 8), 8
    with caplog.at_level(logging.INFO, logger="quantsparse"):
        for block in range(4):
            q, k, v = (torch.randn(1, 2, txt + 256, 64, generator=rng) for _ in range(3))
            fn(q, k, v, None, AttentionCall("double", block, 4, txt, grid, StepInfo(0, torch.linspace(1, 0, 5))))
    assert fn.placement == want
    assert f"SSAR cache placement {want}" in caplog.text

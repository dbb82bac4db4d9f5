"""Read-ahead of calibration samples (calib/prefetch.py): the same tensors in the same order as direct
reads, reused host buffers, read errors raised in the main thread, no per-step loss read-back, and the
streaming calibration's file unchanged."""
import math
import os
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from quantsparse_core.calib import stream_budget, stream_train
from quantsparse_core.calib.block_source import StateDictSource
from quantsparse_core.calib.calibrate import CalibSettings
from quantsparse_core.calib.prefetch import DEPTH, HostRing, Part, Prefetcher
from quantsparse_core.calib.stream_pipeline import capture_to
from quantsparse_core.calib.streaming import calibrate_streaming
from quantsparse_core.calib.tensor_store import TensorStore
from quantsparse_core.models.config import get_preset

sys.path.insert(0, os.path.dirname(__file__))
from test_calibration_streaming import LATENT, _job  # noqa: E402

N = 5  # odd: the two ring slots alternate unevenly


def _entries(rng, n=N, img=7):
    """Per sample: (img bf16 [1, img, 4], txt bf16 [1, 3, 4], None, indices int64 [1, 3])."""
    return [(torch.randn(1, img, 4, generator=rng).to(torch.bfloat16), torch.randn(1, 3, 4, generator=rng).to(torch.bfloat16),
             None, torch.randint(0, 10, (1, 3), generator=rng)) for _ in range(n)]


def _store(entries, tmp_path, on_disk):
    store = TensorStore(tmp_path / "s.bin" if on_disk else None)
    for e in entries:
        store.append(e)
    return store


def _parts(store):
    return [Part(store, (0, 1), torch.float32),   # cat(img, txt) in float32, like a double block's target
            Part(store, (1, 0)),                  # cat(txt, img), like the first single block's input
            Part(store, (2,), torch.float32),     # absent
            Part(store, (-1,))]                   # indices, as stored


def _expected(entries, j):
    img, txt, _, idx = entries[j]
    return torch.cat((img, txt), 1).float(), torch.cat((txt, img), 1), None, idx


def _two_epochs(rng):
    return torch.randperm(N, generator=rng).tolist() + torch.randperm(N, generator=rng).tolist()


@pytest.mark.parametrize("on_disk", [False, True])
def test_prefetch_yields_the_direct_reads_in_order_across_an_epoch_boundary(rng, tmp_path, on_disk):
    entries = _entries(rng)
    store = _store(entries, tmp_path, on_disk)
    order = _two_epochs(rng)
    seen = []
    with Prefetcher(_parts(store), order, "cpu") as feed:
        for j, got in feed:
            seen.append(j)
            for want, have in zip(_expected(entries, j), got):
                assert (want is None and have is None) or (have.dtype == want.dtype and torch.equal(have, want))
            # the store's own direct read agrees as well
            assert torch.equal(got[3], store.get(j)[3])
    assert seen == order
    assert not feed._thread.is_alive() and not feed.ring.busy


def test_ring_buffers_are_allocated_once_and_reused(rng, tmp_path):
    entries = _entries(rng)
    store = _store(entries, tmp_path, on_disk=True)
    ring = HostRing(DEPTH)
    keys = 2 + 2 + 1          # buffers per slot: img and txt of two parts, the indices (nothing for None)
    for _ in range(2):        # two loops over the same block share the ring (fp pass, training, ...)
        with Prefetcher(_parts(store), _two_epochs(rng), "cpu", ring) as feed:
            n = sum(1 for _ in feed)
        assert n == 2 * N
        assert ring.allocations == DEPTH * keys
    assert ring.nbytes == DEPTH * sum(t.numel() * t.element_size() for t in
                                      (entries[0][0], entries[0][1], entries[0][1], entries[0][0], entries[0][3]))
    # a larger sample grows only the buffers it needs
    big = _entries(rng, n=1, img=9)[0]
    store.append(big)
    with Prefetcher(_parts(store), [N], "cpu", ring) as feed:
        (j, got), = list(feed)
        assert torch.equal(got[0], torch.cat(big[:2], 1).float())
    assert ring.allocations == DEPTH * keys + 2   # the two img buffers of one slot


def test_ram_store_items_are_handed_out_without_copies_on_the_cpu(rng, tmp_path):
    entries = _entries(rng)
    store = _store(entries, tmp_path, on_disk=False)
    ring = HostRing(DEPTH)
    with Prefetcher([Part(store, (0,)), Part(store, (3,))], range(N), "cpu", ring) as feed:
        for j, got in feed:
            assert got[0] is store.get(j)[0] and got[1] is store.get(j)[3]
    assert ring.allocations == 0


def _consume(feed, out):
    try:
        for j, got in feed:
            out.append((j, got[0].clone()))
    except BaseException as e:  # recorded for the test
        out.append(e)


def test_a_failing_read_raises_the_stores_error_in_the_main_thread(rng, tmp_path):
    entries = _entries(rng)
    store = _store(entries, tmp_path, on_disk=True)
    # cut the file inside sample 3: samples 0-2 stay readable
    cut = store.index[3][0][0] + 4
    os.truncate(tmp_path / "s.bin", cut)
    feed = Prefetcher([Part(store, (0,))], [0, 1, 2, 3, 4], "cpu")
    out = []
    t = threading.Thread(target=_consume, args=(feed, out))
    t.start()
    t.join(30)
    assert not t.is_alive(), "the loop hung on a failed read"
    assert [j for j, _ in out[:-1]] == [0, 1, 2]
    for j, got in out[:-1]:
        assert torch.equal(got, entries[j][0])
    err = out[-1]
    assert isinstance(err, ValueError) and "shorter than its index says" in str(err)
    assert not feed._thread.is_alive() and not feed.ring.busy


def test_other_errors_and_early_exit_stop_the_thread(rng, tmp_path):
    store = _store(_entries(rng), tmp_path, on_disk=False)

    class Broken:
        def get(self, j, fields=None, out=None):
            if j == 2:
                raise OSError("disk unplugged while reading sample 2")
            return store.get(j, fields, out)
    got = []
    with pytest.raises(OSError, match="disk unplugged while reading sample 2"):
        with Prefetcher([Part(Broken(), (0,))], range(N), "cpu") as feed:
            for j, _ in feed:
                got.append(j)
    assert got == [0, 1]
    ring = HostRing(DEPTH)
    with Prefetcher([Part(store, (0,))], range(N), "cpu", ring) as feed:
        with pytest.raises(RuntimeError, match="used by another prefetcher"):
            Prefetcher([Part(store, (0,))], range(N), "cpu", ring)
        for j, _ in feed:
            if j == 1:
                break
    assert not feed._thread.is_alive() and not ring.busy


def test_streaming_calibration_is_bit_identical_with_and_without_prefetch_and_reads_losses_once(rng, tmp_path,
                                                                                                   monkeypatch):
    """Prefetch with every block's data on disk vs. direct reads in RAM (the loop as before), on one
    capture of 3 samples, 2 epochs: the same packed tensors and losses, bit for bit. The training loop
    reads its loss values only once per epoch and at the end."""
    sd, cond = _job(rng)
    settings = CalibSettings(method="msad", epochs=2)
    source = StateDictSource(sd)
    cap = capture_to(tmp_path / "cap", source, cond, LATENT, 3, 3, 5, "cpu", source.dtype)
    reads = []
    real_item = torch.Tensor.item

    def item(self):
        f = sys._getframe(1)
        if f.f_code.co_name in ("_train", "<dictcomp>") and f.f_code.co_filename == stream_train.__file__:
            reads.append(f.f_lineno)
        return real_item(self)
    monkeypatch.setattr(torch.Tensor, "item", item)
    epochs_seen = []
    _, fast_report, fast_dir = calibrate_streaming(source, cap, settings, workdir=tmp_path / "fast", host_budget=1,
                                                   progress=lambda b, n, e, loss: epochs_seen.append(e))
    assert not any((tmp_path / "fast").glob("*.bin"))   # spilled stores are deleted after their block
    blocks = 2
    assert len(epochs_seen) == blocks * settings.epochs
    assert len(reads) == blocks * (settings.epochs + 3)   # one loss per epoch, three final terms per block
    monkeypatch.setattr(stream_train, "PREFETCH", False)
    _, direct_report, direct_parts = calibrate_streaming(source, cap, settings)
    assert fast_report == direct_report
    for name, tensors in direct_parts.items():
        fast = load_file(str(fast_dir / f"{name}.packed.safetensors"))
        assert fast.keys() == tensors.keys()
        for k, v in tensors.items():
            assert torch.equal(fast[k], v), (name, k)
    cap.store.close()


def test_estimate_counts_the_prefetch_rings(monkeypatch):
    config = get_preset("hunyuan-video-13b")
    settings = CalibSettings(method="msad")
    latent, txt, n = (16, 19, 60, 106), 256, 20
    est = stream_budget.estimate(config, latent, txt, n, 20, settings, torch.bfloat16)
    tokens = txt + 19 * 30 * 53
    c, heads = config.hidden_size, config.num_heads
    per_sample = 2 * tokens * c * 2 + heads * (256 * tokens + math.ceil(tokens / 128) ** 2) * 2
    assert est["tokens"] == tokens
    assert est["host_ring_bytes"] == DEPTH * per_sample
    assert est["host_bytes"] == est["host_capture_bytes"] + est["host_block_bytes"] + DEPTH * per_sample
    monkeypatch.setattr(stream_budget, "PREFETCH_DEPTH", 0)
    bare = stream_budget.estimate(config, latent, txt, n, 20, settings, torch.bfloat16)
    assert est["gpu_bytes"] - bare["gpu_bytes"] == DEPTH * per_sample
    assert "read-ahead buffers 1.4 GB" in stream_budget.describe(est)

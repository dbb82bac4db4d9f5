"""Streaming calibration: same file as pipeline.compress, one block resident at a time, disk spill
round trip, resume after the last finished block, refusal before work."""
import weakref

import pytest
import torch

from quantsparse_core.calib.block_source import SafetensorsSource, StateDictSource
from quantsparse_core.calib.calibrate import CalibSettings
from quantsparse_core.calib.pipeline import Conditioning, compress, state_dict_hash
from quantsparse_core.calib.stream_pipeline import compress_streaming
from quantsparse_core.calib.tensor_store import TensorStore
from quantsparse_core.models.config import PRESETS
from quantsparse_core.models.hunyuan_video import HunyuanVideoDiT
from quantsparse_core.models.weights import atomic_save_safetensors

LATENT = (16, 2, 4, 6)  # 12 video tokens
KW = dict(n_samples=2, steps=3, seed=7)


def _job(rng, config=PRESETS["test"]):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    sd = {k: v.clone() for k, v in HunyuanVideoDiT(config).state_dict().items()}
    mask = torch.ones(1, 6)
    mask[0, 4:] = 0
    cond = Conditioning(torch.randn(1, 6, config.context_in_dim, generator=rng), torch.randn(1, 768, generator=rng),
                        mask, guidance=6.0)
    return sd, cond


class Spy(StateDictSource):
    """Counts blocks built from the source that are alive at the same time."""

    def __init__(self, sd):
        super().__init__(sd)
        self.alive, self.peak, self.built = 0, 0, 0

    def block(self, kind, idx, device, dtype=None):
        blk = super().block(kind, idx, device, dtype)
        self.alive += 1
        self.built += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(blk, self._gone)
        return blk

    def _gone(self):
        self.alive -= 1


def test_streaming_writes_the_same_file_as_the_whole_model_path_one_block_at_a_time(rng, tmp_path):
    sd, cond = _job(rng)
    settings = CalibSettings(method="msad", epochs=1)
    whole, streamed = tmp_path / "a" / "m.safetensors", tmp_path / "b" / "m.safetensors"
    compress(sd, cond, LATENT, whole, settings, **KW)
    src = Spy(sd)
    compress_streaming(src, cond, LATENT, streamed, settings, **KW)
    assert whole.read_bytes() == streamed.read_bytes()      # tensors and header, byte for byte
    assert src.peak == 1                                    # never two blocks built at once
    # capture: 1 trajectory x 3 steps x 2 blocks; calibration: one build per block
    assert src.built == 3 * 2 + 2
    assert not (streamed.parent / ".quantsparse-partial").exists()


def test_disk_spill_and_safetensors_source_give_the_same_file(rng, tmp_path):
    sd, cond = _job(rng)
    settings = CalibSettings(method="block", epochs=1)
    ram, disk = tmp_path / "ram" / "m.safetensors", tmp_path / "disk" / "m.safetensors"
    compress_streaming(StateDictSource(sd), cond, LATENT, ram, settings, **KW)
    weights = tmp_path / "dit.safetensors"
    atomic_save_safetensors(sd, weights)
    src = SafetensorsSource(weights)
    assert src.fingerprint() == state_dict_hash(sd)
    compress_streaming(src, cond, LATENT, disk, settings, host_budget=1, **KW)  # every block's data to disk
    assert ram.read_bytes() == disk.read_bytes()


def test_tensor_store_disk_round_trip(rng, tmp_path):
    entries = [(torch.randn(2, 5, 3, generator=rng).to(torch.bfloat16), None, torch.tensor(3.5)),
               (torch.randn(7, generator=rng), torch.randint(0, 9, (4, 2), generator=rng), torch.zeros(0))]
    store = TensorStore(tmp_path / "x.bin")
    for e in entries:
        store.append(e)
    store.finish(tmp_path / "x.json")
    store.close()
    back = TensorStore.open(tmp_path / "x.json")
    assert len(back) == 2
    for want, got in zip(entries, (back.get(0), back.get(1))):
        for a, b in zip(want, got):
            assert (a is None and b is None) or (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    back.close()
    (tmp_path / "x.bin").write_bytes(b"short")
    with pytest.raises(ValueError, match="delete the partial folder"):
        TensorStore.open(tmp_path / "x.json")


def cancelled_in_second_block(sd, cond, latent, settings, tmp_path, name, **kw):
    """(the file of the uninterrupted job, the output path and partial folder of the same job cancelled while
    its second block calibrates); the capture is finished by then and no output file exists."""
    ref = tmp_path / "ref" / name
    compress_streaming(StateDictSource(sd), cond, latent, ref, settings, **kw)
    out = tmp_path / "job" / name

    def cancel_in_second_block(block, n, epoch, loss):
        if block == 1:
            raise KeyboardInterrupt("cancel")
    with pytest.raises(KeyboardInterrupt):
        compress_streaming(StateDictSource(sd), cond, latent, out, settings, progress=cancel_in_second_block, **kw)
    assert not out.exists()
    (partial,) = (out.parent / ".quantsparse-partial").iterdir()
    assert (partial / "capture.index.json").exists()
    return ref, out, partial


def test_cancel_then_resume_reuses_capture_and_finished_blocks_and_gives_the_same_file(rng, tmp_path):
    sd, cond = _job(rng)
    settings = CalibSettings(method="block+local", epochs=1)
    ref, out, partial = cancelled_in_second_block(sd, cond, LATENT, settings, tmp_path, "m.safetensors", **KW)
    assert (partial / "double_blocks.0.safetensors").exists()
    assert not (partial / "single_blocks.0.safetensors").exists()
    src, seen = Spy(sd), []
    compress_streaming(src, cond, LATENT, out, settings, progress=lambda b, n, e, l: seen.append((b, l)), **KW)
    assert src.built == 2                         # replay block 0, calibrate block 1: the capture was reused
    assert seen[0] == (0, None)                   # block 0 replayed: one tick for the bar (and Cancel), no training
    assert not [b for b, loss in seen if b == 0 and loss is not None] and [b for b, loss in seen if b == 1]
    assert ref.read_bytes() == out.read_bytes()


def test_too_little_memory_is_refused_before_any_work(rng, tmp_path):
    sd, cond = _job(rng)
    with pytest.raises(MemoryError, match="smaller calibration latent"):
        compress_streaming(StateDictSource(sd), cond, LATENT, tmp_path / "m.safetensors",
                           CalibSettings(method="rtn"), gpu_budget=1000, **KW)
    with pytest.raises(ValueError, match="propagation 'x' unknown"):
        compress_streaming(StateDictSource(sd), cond, LATENT, tmp_path / "m.safetensors",
                           CalibSettings(method="rtn"), propagation="x", **KW)
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.bin"))


def test_block_stores_share_the_host_budget_and_count_pinned_rounding(rng, tmp_path):
    """One block holds its inputs, targets and MSAD maps at once: they share the budget (each store used to be
    checked alone, so three stores of 0.9 x the budget all stayed in RAM). Page-locked stores count PyTorch's
    power-of-two rounding; where only the exact size fits, the store stays in RAM unpinned; closing frees."""
    from quantsparse_core.calib.streaming import _Stores, pinned_bytes

    assert pinned_bytes(20 * 185_600_000, 20) == int(20 * (1 << 28) * 1.02)   # 0.19 GB activations -> 256 MiB each
    assert pinned_bytes(0, 20) == 0
    mb = 1 << 20
    stores = _Stores(tmp_path, host_budget=100 * mb, pinning=True)
    a = stores.new("a", 40 * mb, entries=4)         # pinned: 4 x 16 MiB x 1.02 = 65.3 MiB
    assert not a.on_disk and stores.in_ram() == int(64 * mb * 1.02)
    b = stores.new("b", 30 * mb, entries=3)         # pinned 40.8 MiB does not fit the 34.7 left; exact 30 does
    assert not b.on_disk and stores.in_ram() == int(64 * mb * 1.02) + 30 * mb
    c = stores.new("c", 10 * mb, entries=1)         # 4.7 MiB left: to disk
    assert c.on_disk and stores.spilled_bytes == 10 * mb
    x = torch.randn(3, 5, generator=rng)
    c.append((x,))
    assert torch.equal(c.get(0)[0], x)
    a.close(delete=True)
    assert stores.in_ram() == 30 * mb
    d = stores.new("d", 40 * mb, entries=4)         # room again once `a` is gone
    assert not d.on_disk
    for s in (b, c, d):
        s.close(delete=True)
    assert stores.in_ram() == 0 and not any(tmp_path.iterdir())


def test_a_cancelled_job_leaves_no_spill_files(rng, tmp_path):
    """With every block's data on disk (host budget 1 byte), a job cancelled while its second block calibrates
    deletes the targets / inputs / MSAD files it had open; the capture and the finished block stay for the
    resume, which still gives the uninterrupted job's file."""
    sd, cond = _job(rng)
    settings = CalibSettings(method="block+local", epochs=1)
    ref, out, partial = cancelled_in_second_block(sd, cond, LATENT, settings, tmp_path, "m.safetensors",
                                                  host_budget=1, **KW)
    left = sorted(p.name for p in partial.rglob("*.bin"))
    assert left and all(name.startswith("capture") for name in left), left
    assert (partial / "double_blocks.0.safetensors").exists()
    compress_streaming(StateDictSource(sd), cond, LATENT, out, settings, host_budget=1, **KW)
    assert ref.read_bytes() == out.read_bytes()


def test_disk_check_counts_the_compressed_parts_and_output_and_credits_a_resumed_job(rng, tmp_path, monkeypatch):
    """The disk a job needs: capture + one block's data + the packed per-block parts + the output file (about
    the compressed size each); a resumed job is credited with what its partial folder already holds, so a rerun
    after Cancel is not refused for the capture it wrote itself."""
    from quantsparse_core.calib import stream_pipeline
    from quantsparse_core.calib.stream_budget import check_fits
    g = 2 ** 30
    est = {"gpu_bytes": 0, "tokens": 1, "host_capture_bytes": 10 * g, "host_block_bytes": 4 * g}
    with pytest.raises(MemoryError, match="16.0 GB of disk"):
        check_fits(est, None, disk_free=15 * g, output_bytes=g)
    check_fits(est, None, disk_free=15 * g, output_bytes=g, on_disk=2 * g)  # 14 GB still to write: fits
    with pytest.raises(MemoryError, match="already in the job's partial folder"):
        check_fits(est, None, disk_free=13 * g, output_bytes=g, on_disk=2 * g)

    calls = []

    def spy(est, gpu_budget, disk_free=None, output_bytes=0, on_disk=0):
        calls.append((disk_free is not None, output_bytes, on_disk))
        return check_fits(est, gpu_budget, disk_free, output_bytes, on_disk)
    monkeypatch.setattr(stream_pipeline, "check_fits", spy)
    sd, cond = _job(rng)
    settings = CalibSettings(method="block", epochs=1)
    _, out, partial = cancelled_in_second_block(sd, cond, LATENT, settings, tmp_path, "m.safetensors", **KW)
    calls.clear()
    compress_streaming(StateDictSource(sd), cond, LATENT, out, settings, **KW)
    (disk_call,) = [c for c in calls if c[0]]
    assert disk_call[1] > 0 and disk_call[2] > 0  # the compressed size counted, the partial folder credited

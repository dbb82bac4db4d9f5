"""Read the next samples of a calibration loop while the current one computes.

A background thread reads each sample's tensors from their TensorStores (RAM or disk) into a small
ring of reusable host buffers (page-locked for CUDA; allocated once, not per step). The main thread
copies each sample to the device one sample ahead, on a side stream without blocking, into a ring of
device buffers; the compute stream waits for that copy only where it uses the tensors. A host buffer
is read into again only after the copy out of it has completed (a CUDA event), a device buffer only
after the steps that used it (an event on the compute stream). At most `depth` (2) samples are in
flight on the host and on the device. On the CPU the same code runs without pinning, streams or
events, and yields the same tensors, in the same order, as direct reads.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Optional

import torch

DEPTH = 2                 # samples in flight: the one in use and the next
_JOIN_S = 60.0            # close(): how long to wait for a read in progress to end


@dataclass(frozen=True)
class Part:
    """One tensor of a sample: the entry's `fields` of `store` (a TensorStore), concatenated along dim 1
    when several (all None: the part is None), then cast to `dtype` on the device (None: as stored)."""
    store: object
    fields: tuple
    dtype: Optional[torch.dtype] = None


class HostSlot:
    """The host buffers one sample in flight is read into, kept and reused by key."""

    def __init__(self, ring: "HostRing"):
        self.ring, self.buffers = ring, {}

    def buffer(self, key, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of nbytes for `key`, reallocated only when a larger one is needed."""
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            self.buffers.pop(key, None)
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.ring.pin)
            self.buffers[key] = buf
            self.ring.allocations += 1
        return buf[:nbytes]


class HostRing:
    """`depth` slots of host buffers (page-locked when `pin`), shared by the loops over one block's
    samples (one at a time); `allocations` counts the buffers ever made, `nbytes` what they hold."""

    def __init__(self, depth: int = DEPTH, pin: bool = False):
        if depth < 1:
            raise ValueError(f"a prefetch ring needs at least 1 slot, got {depth}")
        self.pin = bool(pin and torch.cuda.is_available())
        self.slots = [HostSlot(self) for _ in range(depth)]
        self.allocations = 0
        self.busy = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for s in self.slots for b in s.buffers.values())


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


@dataclass
class _Staged:
    pos: int
    j: int
    tensors: list            # per part: None or a tensor (device buffer view, or host tensor on the CPU)
    slot: HostSlot           # CPU: the host slot to give back once the sample is finished with
    event: object = None     # CUDA: the copy's completion
    dev_slot: int = 0


class Prefetcher:
    """Iterate (j, tensors) for j in `order`: tensors[k] is parts[k] of sample j on `device`, valid until
    the next iteration. Reads run ahead on a thread; use as a context manager (or call close()) so that
    the thread stops when the loop ends early. A failed read raises its exception here, at its sample."""

    def __init__(self, parts, order, device, ring: Optional[HostRing] = None):
        self.parts, self.order = tuple(parts), list(order)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ring = ring if ring is not None else HostRing(DEPTH, pin=self.cuda)
        if self.ring.busy:
            raise RuntimeError("this host ring is used by another prefetcher; close that one first")
        self.ring.busy = True
        depth = len(self.ring.slots)
        self._free = queue.Queue()            # (host slot, copy event or None) ready to be read into
        for slot in self.ring.slots:
            self._free.put((slot, None))
        self._ready = queue.Queue()           # (pos, j, slot, host tensors per part) or _Failed
        self._failure = None
        self._next = 0                        # position in `order` of the next sample handed out
        self._held = self._staged = None
        self._stop = threading.Event()
        self._closed = False
        if self.cuda:
            self._compute = torch.cuda.current_stream(self.device)
            self._copy = torch.cuda.Stream(self.device)
            self._dev = [{} for _ in range(depth)]      # per device slot: part index -> uint8 device buffer
            self._dev_free = [None] * depth             # per device slot: compute event after its last use
        self._thread = threading.Thread(target=self._work, name="calib-prefetch", daemon=True)
        self._thread.start()

    # -- the reading thread ----------------------------------------------------------------------------
    def _work(self):
        try:
            for pos, j in enumerate(self.order):
                got = self._free.get()
                if got is None or self._stop.is_set():
                    return
                slot, copied = got
                if copied is not None:
                    copied.synchronize()   # the device copy out of this slot has finished
                host = [self._read(k, part, j, slot) for k, part in enumerate(self.parts)]
                self._ready.put((pos, j, slot, host))
        except BaseException as e:  # handed to the main thread, raised there
            self._ready.put(_Failed(e))

    def _read(self, k: int, part: Part, j: int, slot: HostSlot) -> tuple:
        got = part.store.get(j, part.fields, lambda f, n: slot.buffer((k, f), n))
        if not self.cuda:
            return got
        out = []
        for f, t in enumerate(got):   # held in ordinary RAM: staged in page-locked memory for an async copy
            if t is not None and self.ring.pin and not t.is_pinned():
                buf = slot.buffer((k, f), t.numel() * t.element_size())
                t = buf.view(t.dtype).view(t.shape).copy_(t)
            out.append(t)
        return tuple(out)

    # -- the main thread -------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __next__(self):
        if self._closed:
            raise StopIteration
        self._release(self._held)
        self._held = None
        if self._next >= len(self.order):
            self.close()
            raise StopIteration
        st = self._staged if self._staged is not None else self._stage(self._take(block=True))
        self._staged = None
        self._next += 1
        if self.cuda and self._next < len(self.order):   # start the next sample's copy now, if it is read
            nxt = self._take(block=False)
            if nxt is not None:
                self._staged = self._stage(nxt)
        self._held = st
        return st.j, self._hand_out(st)

    def _take(self, block: bool):
        if self._failure is None:
            while True:
                try:
                    item = self._ready.get(timeout=0.5) if block else self._ready.get_nowait()
                except queue.Empty:
                    if not block:
                        return None
                    if not self._thread.is_alive() and self._ready.empty():
                        raise RuntimeError("the calibration prefetch thread ended without a result") from None
                    continue
                if not isinstance(item, _Failed):
                    return item
                self._failure = item
                break
        if not block:
            return None
        err = self._failure.error
        self.close()
        raise err

    def _stage(self, item) -> _Staged:
        pos, j, slot, host = item
        if pos != self._next:
            raise RuntimeError(f"prefetch out of order: got position {pos}, expected {self._next}")
        if not self.cuda:
            tensors = [None if all(t is None for t in fs) else
                       (fs[0] if len(fs) == 1 else torch.cat(fs, dim=1)) for fs in host]
            return _Staged(pos, j, tensors, slot)
        d = pos % len(self._dev)
        layout = [self._layout(fs) for fs in host]
        bufs, fresh = self._dev[d], False
        for k, lay in enumerate(layout):   # device buffers are allocated on the compute stream, once
            if lay is not None and (k not in bufs or bufs[k].numel() < lay[2]):
                bufs.pop(k, None)
                bufs[k] = torch.empty(lay[2], dtype=torch.uint8, device=self.device)
                fresh = True
        if fresh:   # fresh memory may still be read by queued compute work: copy after it
            self._copy.wait_stream(self._compute)
        with torch.cuda.stream(self._copy):
            if self._dev_free[d] is not None:
                self._copy.wait_event(self._dev_free[d])
            tensors = []
            for k, (fs, lay) in enumerate(zip(host, layout)):
                if lay is None:
                    tensors.append(None)
                    continue
                shape, dtype, n = lay
                dst = bufs[k][:n].view(dtype).view(shape)
                at = 0
                for t in fs:
                    piece = dst if len(fs) == 1 else dst.narrow(1, at, t.shape[1])
                    if t.numel():
                        piece.copy_(t, non_blocking=True)
                    at += t.shape[1] if t.dim() > 1 else 0
                tensors.append(dst)
            event = torch.cuda.Event()
            event.record(self._copy)
        self._free.put((slot, event))   # the thread may read into this host slot once the copy is done
        return _Staged(pos, j, tensors, slot, event, d)

    @staticmethod
    def _layout(fs):
        """(shape, dtype, bytes) of the fields concatenated along dim 1; None when all are None."""
        if all(t is None for t in fs):
            return None
        if any(t is None for t in fs):
            raise ValueError("a prefetched part mixes missing and present tensors; store them as separate parts")
        first = fs[0]
        if len(fs) > 1 and any(t.dtype != first.dtype or t.dim() != first.dim() for t in fs):
            raise ValueError("tensors concatenated into one part must share dtype and rank")
        shape = list(first.shape)
        if len(fs) > 1:
            shape[1] = sum(t.shape[1] for t in fs)
        n = torch.Size(shape).numel() * first.element_size()
        return tuple(shape), first.dtype, n

    def _hand_out(self, st: _Staged) -> tuple:
        if self.cuda:
            self._compute.wait_event(st.event)
        return tuple(None if t is None else (t if p.dtype is None else t.to(p.dtype))
                     for p, t in zip(self.parts, st.tensors))

    def _release(self, st: Optional[_Staged]) -> None:
        """The main thread is done with sample `st`: its buffers may be refilled."""
        if st is None:
            return
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self._compute)
            self._dev_free[st.dev_slot] = done
        else:
            self._free.put((st.slot, None))

    def close(self) -> None:
        """Stop the thread (after the read in progress, if any) and give the rings back."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._free.put(None)
        self._thread.join(_JOIN_S)
        if self.cuda:
            self._compute.wait_stream(self._copy)   # copies in flight end before their buffers are reused
            self._dev = []
        self._held = self._staged = None
        if self._thread.is_alive():   # a read still hangs: its slot may yet be written, so the ring stays taken
            raise RuntimeError(f"a calibration read did not finish within {_JOIN_S:.0f} s; check the disk "
                               "holding the partial folder")
        self.ring.busy = False

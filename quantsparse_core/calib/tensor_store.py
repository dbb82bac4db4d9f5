"""Per-sample block activations, held in host RAM or in one file on disk.

Streaming calibration holds one block's inputs (all samples) at a time. When host memory is short
they go to a file beside the partial results, written once and read back one sample at a time with
positional reads (no mapping: the pages stay in the OS cache, not in the process's resident set).
The same file, with its index, is how a finished capture survives for resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.uint8, torch.int8, torch.bool)}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in fresh page-locked host memory (contiguous)."""
    dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    dst.copy_(t.detach())
    return dst


class TensorStore:
    """An append-only list of tuples of tensors (entries may be None).

    path None: kept in RAM (page-locked when `pin` and CUDA is available, for fast copies).
    path given: bytes go to that file; get(i) reads entry i into fresh (optionally pinned) memory, or
    into buffers the caller reuses (prefetch.py's ring).
    """

    def __init__(self, path=None, pin: bool = False):
        self.path = None if path is None else Path(path)
        self.pin = bool(pin and torch.cuda.is_available())
        self.items, self.index, self.size = [], [], 0
        self._fd = None
        self.closed = False
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def __len__(self) -> int:
        return len(self.index) if self.path is not None else len(self.items)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def append(self, tensors) -> None:
        if self.path is None and self.pin:  # one copy straight into page-locked memory (a device tensor: one DMA)
            tensors = tuple(None if t is None else _pinned_copy(t) for t in tensors)
        else:
            tensors = tuple(None if t is None else t.detach().to("cpu").contiguous() for t in tensors)
        if self.path is None:
            self.items.append(tensors)
            self.size += nbytes(tensors)
            return
        entry = []
        for t in tensors:
            if t is None:
                entry.append(None)
                continue
            raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            n = t.numel() * t.element_size()
            done = 0
            view = memoryview(raw).cast("B") if n else memoryview(b"")
            while done < n:
                done += os.pwrite(self._fd, view[done:], self.size + done)
            entry.append([self.size, list(t.shape), str(t.dtype)])
            self.size += n
        self.index.append(entry)

    def width(self, i: int) -> int:
        """How many tensors (or None) entry i holds."""
        return len(self.index[i]) if self.path is not None else len(self.items[i])

    def get(self, i: int, fields=None, out=None) -> tuple:
        """Entry i, or only its positions `fields` (negative counts from the end) in that order.

        In RAM: the stored tensors themselves. On disk: each tensor k of the result is read into
        out(k, nbytes) when given (a uint8 CPU tensor of nbytes the caller reuses), else into fresh
        (optionally pinned) memory. Safe to call from another thread than the one appending."""
        entry = self.items[i] if self.path is None else self.index[i]
        if fields is not None:
            entry = [entry[f] for f in fields]
        if self.path is None:
            return tuple(entry)
        result = []
        for k, e in enumerate(entry):
            if e is None:
                result.append(None)
                continue
            off, shape, dtype = e
            dt = _DTYPES[dtype]
            n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            buf = out(k, n) if out is not None else torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
            if buf.dtype != torch.uint8 or buf.numel() != n or not buf.is_contiguous():
                raise ValueError(f"a read buffer must be a contiguous uint8 tensor of {n} bytes, got "
                                 f"{buf.dtype} x {buf.numel()}")
            self._read_into(buf, off, n)
            result.append(buf.view(dt).reshape(shape))
        return tuple(result)

    def _read_into(self, buf: torch.Tensor, off: int, n: int) -> None:
        view, done = memoryview(buf.numpy()).cast("B") if n else memoryview(b""), 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], off + done)
            if got <= 0:
                raise ValueError(f"{self.path} is shorter than its index says; delete the partial folder "
                                 "and run again")
            done += got

    def finish(self, index_path) -> None:
        """Flush to disk and write the index (atomically, last): the file is complete and reusable."""
        if self.path is None:
            raise ValueError("finish() needs a store on disk")
        os.fsync(self._fd)
        index_path = Path(index_path)
        tmp = index_path.with_name(index_path.name + ".tmp")
        tmp.write_text(json.dumps({"file": self.path.name, "size": self.size, "entries": self.index}))
        tmp.replace(index_path)

    @classmethod
    def open(cls, index_path, pin: bool = False) -> "TensorStore":
        """A finished store on disk, for reading (raises ValueError if it is damaged)."""
        index_path = Path(index_path)
        try:
            meta = json.loads(index_path.read_text())
            path = index_path.parent / meta["file"]
            if path.stat().st_size != meta["size"]:
                raise ValueError(f"size {path.stat().st_size} != {meta['size']}")
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{index_path} does not describe a complete stored capture ({e}); delete the "
                             "partial folder and run again") from None
        self = cls.__new__(cls)
        self.path, self.pin = path, bool(pin and torch.cuda.is_available())
        self.items, self.index, self.size = [], meta["entries"], meta["size"]
        self._fd = os.open(path, os.O_RDONLY)
        self.closed = False
        return self

    def close(self, delete: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete and self.path is not None:
            self.path.unlink(missing_ok=True)
        self.items = []
        self.closed = True

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

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


class TensorStore:
    """An append-only list of tuples of tensors (entries may be None).

    path None: kept in RAM (page-locked when `pin` and CUDA is available, for fast copies).
    path given: bytes go to that file; get(i) reads entry i into fresh (optionally pinned) memory.
    """

    def __init__(self, path=None, pin: bool = False):
        self.path = None if path is None else Path(path)
        self.pin = bool(pin and torch.cuda.is_available())
        self.items, self.index, self.size = [], [], 0
        self._fd = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def __len__(self) -> int:
        return len(self.index) if self.path is not None else len(self.items)

    @property
    def on_disk(self) -> bool:
        return self.path is not None

    def append(self, tensors) -> None:
        tensors = tuple(None if t is None else t.detach().to("cpu").contiguous() for t in tensors)
        if self.path is None:
            if self.pin:
                tensors = tuple(None if t is None else t.pin_memory() for t in tensors)
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

    def get(self, i: int) -> tuple:
        if self.path is None:
            return self.items[i]
        out = []
        for e in self.index[i]:
            if e is None:
                out.append(None)
                continue
            off, shape, dtype = e
            dt = _DTYPES[dtype]
            n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
            view, done = memoryview(buf.numpy()).cast("B"), 0
            while done < n:
                got = os.preadv(self._fd, [view[done:]], off + done)
                if got <= 0:
                    raise ValueError(f"{self.path} is shorter than its index says; delete the partial folder "
                                     "and run again")
                done += got
            out.append(buf.view(dt).reshape(shape))
        return tuple(out)

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
        return self

    def close(self, delete: bool = False) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if delete and self.path is not None:
            self.path.unlink(missing_ok=True)
        self.items = []

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

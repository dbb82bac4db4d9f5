"""Page-locked host memory for the cpu-pinned SSAR cache, without PyTorch's power-of-two rounding.

PyTorch's pinned allocator rounds every request up to a power of two (ATen's CachingHostAllocator:
`PowerOf2Ceil(size)`), so one 720p residual of 119,056 x 3072 bf16 (0.73 GB) pins 1 GiB, and a 60-block
cache pins 64 GB for 44 GB of data; at refresh time each new residual was also allocated before the old one
was freed. Here the cache takes its memory as slabs of SLAB_BYTES (a power of two: nothing rounded away)
and each entry is a run of bytes across them (a few pieces, copied one by one); entries of a size seen
before reuse freed runs of that size, and a key that is written again is overwritten in place. Host use
is the data, plus freed runs of a size not asked for again, plus at most one partly used slab. Plain PyTorch calls only (no cudaHostRegister, which WSL
does not support).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

SLAB_BYTES = 1 << 28   # 256 MiB
ALIGN = 4096           # entries start on page boundaries (DMA-friendly)


class HostSlabs:
    """A bump allocator over page-locked slabs, with freed runs kept per size for the next entry of that size."""

    def __init__(self, pin: bool, slab_bytes: int = SLAB_BYTES):
        if slab_bytes < ALIGN or slab_bytes & (slab_bytes - 1):
            raise ValueError(f"slab_bytes must be a power of two (what PyTorch's pinned allocator rounds to) of at "
                             f"least {ALIGN}, got {slab_bytes}")
        self.pin, self.slab_bytes = pin, slab_bytes
        self._slabs: List[torch.Tensor] = []
        self._used = 0                              # bytes handed out from the slabs, alignment included
        self._free: Dict[int, List[list]] = {}      # nbytes -> runs (lists of uint8 pieces) given back

    def take(self, nbytes: int) -> List[torch.Tensor]:
        """A run of `nbytes` bytes: uint8 host tensors (pieces) whose sizes add up to nbytes."""
        runs = self._free.get(nbytes)
        if runs:
            return runs.pop()
        self._used = -(-self._used // ALIGN) * ALIGN
        pieces, left = [], nbytes
        while left > 0:
            slab, off = divmod(self._used, self.slab_bytes)
            if slab == len(self._slabs):
                self._slabs.append(torch.empty(self.slab_bytes, dtype=torch.uint8, pin_memory=self.pin))
            n = min(left, self.slab_bytes - off)
            pieces.append(self._slabs[slab][off:off + n])
            self._used += n
            left -= n
        return pieces

    def give_back(self, pieces: List[torch.Tensor]) -> None:
        self._free.setdefault(sum(p.numel() for p in pieces), []).append(pieces)

    def reserved_bytes(self) -> int:
        """Host bytes the slabs hold (what the process really pins)."""
        return len(self._slabs) * self.slab_bytes


class HostEntry:
    """One tensor kept in a run of HostSlabs bytes; written from and read to any device, asynchronously
    towards and from CUDA on the device's current stream. Each write and read towards CUDA records an event,
    and the next access waits for it where streams or the host could overtake it (a read on another stream
    or to the host waits for the write; a write waits for reads still copying the old bytes)."""

    def __init__(self, slabs: HostSlabs, shape, dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = int(torch.Size(self.shape).numel()) * dtype.itemsize
        self.pieces = slabs.take(self.nbytes)
        self._written: Optional[torch.cuda.Event] = None   # the last device->host copy into the pieces
        self._read: Optional[torch.cuda.Event] = None      # the last host->device copy out of them

    def fits(self, x: torch.Tensor) -> bool:
        return tuple(x.shape) == self.shape and x.dtype == self.dtype

    def write(self, x: torch.Tensor) -> None:
        """Copy x (this entry's shape and dtype) in; from CUDA the copy is queued on the current stream."""
        if not self.fits(x):
            raise ValueError(f"a host cache entry of {self.shape} {self.dtype} cannot take {tuple(x.shape)} {x.dtype}")
        if self._read is not None:   # the old bytes may still be on their way to a device
            if x.is_cuda:
                torch.cuda.current_stream(x.device).wait_event(self._read)
            else:
                self._read.synchronize()
        src = x.contiguous().reshape(-1).view(torch.uint8)
        off = 0
        for p in self.pieces:
            p.copy_(src[off:off + p.numel()], non_blocking=x.is_cuda)
            off += p.numel()
        self._written = None
        if x.is_cuda:
            self._written = torch.cuda.Event()
            self._written.record(torch.cuda.current_stream(x.device))

    def read(self, device) -> torch.Tensor:
        """A new tensor on `device` holding the entry; towards CUDA queued on the current stream."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        if self._written is not None:     # the host bytes of a queued device->host copy must have arrived
            if cuda:
                torch.cuda.current_stream(device).wait_event(self._written)
            else:
                self._written.synchronize()
        out = torch.empty(self.shape, dtype=self.dtype, device=device)
        dst = out.reshape(-1).view(torch.uint8)
        off = 0
        for p in self.pieces:
            dst[off:off + p.numel()].copy_(p, non_blocking=cuda)
            off += p.numel()
        if cuda:
            self._read = torch.cuda.Event()
            self._read.record(torch.cuda.current_stream(device))
        return out

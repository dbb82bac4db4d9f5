"""SSAR's small eigendecompositions on a host thread, off the GPU's queue.

The rank-r truncation of D2 needs the top eigenvectors of 24 Gram matrices of 128 x 128 per 720p
layer. `torch.linalg.eigh` on CUDA runs them as ~3,000 small cuSOLVER launches and then waits on the
host for its error flags: 40 ms per layer on an H100 with the GPU queue drained, 2.4 s per refresh
step of HunyuanVideo-13B. Here the Gram matrices (3 MB) go to pinned host memory with a non-blocking
copy, and one worker thread waits for that copy's event and decomposes them on the CPU, while the
Python thread keeps queueing the next layers' GPU work. The eigenvectors come back pinned, so their
upload does not wait for the queue either.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from .low_rank import top_vectors

_lock = threading.Lock()
_worker: Optional[ThreadPoolExecutor] = None


def _executor() -> ThreadPoolExecutor:
    global _worker
    with _lock:
        if _worker is None:
            _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantsparse-eigh")
        return _worker


def _decompose(host: torch.Tensor, ready: Optional[torch.cuda.Event], rank: int, pin: bool) -> torch.Tensor:
    if ready is not None:
        ready.synchronize()     # this thread waits for the copy, not the one queueing GPU work
    v = top_vectors(host, rank)
    return v.pin_memory() if pin else v


class TopVectorsJob:
    """top_vectors(gram, rank) computed on the worker thread; result() is fp32 [..., D, r] on gram's device.

    On CUDA nothing here blocks the calling thread until result() is called while the job still runs
    (done() says whether it would).
    """

    def __init__(self, gram: torch.Tensor, rank: int):
        self.device = gram.device
        ready = None
        if gram.is_cuda:
            host = torch.empty(gram.shape, dtype=gram.dtype, pin_memory=True)
            host.copy_(gram, non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # the worker sleeps on it instead of spinning a core
            ready.record(torch.cuda.current_stream(gram.device))
        else:
            host = gram.detach().clone()  # the caller may reuse its buffer
        self._future: Future = _executor().submit(_decompose, host, ready, rank, gram.is_cuda)

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Drop the job if the worker has not started it (a new run no longer needs it)."""
        self._future.cancel()

    def result(self) -> torch.Tensor:
        return self._future.result().to(self.device, non_blocking=True)


__all__ = ["TopVectorsJob"]

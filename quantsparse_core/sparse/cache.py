"""The SSAR residual cache: its storage (CacheStore), where it lives, and the memory model that chooses
that (METHOD.md §4, "memory the paper does not explain").

One bf16 residual per joint block at 720p/129f is 119,056 x 3072 x 2 B = 0.73 GB; 60 blocks are 44 GB,
more than a 13B model leaves free on an 80 GB GPU. The policies trade accuracy for device memory:

- "gpu-bf16":   bf16 on the compute device (exact up to bf16 rounding).
- "gpu-int8":   int8 with one fp32 absmax scale per token row, on the compute device.
- "cpu-pinned": bf16 in host memory (page-locked when CUDA is available, in slabs that PyTorch's
                allocator does not round up: host_slabs.py; copied back non_blocking); costs host
                memory and PCIe bandwidth instead of device memory.
- "low-rank":   rank-r factors (U S, V^T) per (batch, head) in bf16; lossy, the residual is not low rank.
- "exact":      fp32 on the compute device; for tests and tiny runs, never chosen by "auto".
- "auto":       the most accurate of the first four whose bytes for the whole run fit the budget.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .. import dispatch
from .host_slabs import HostEntry, HostSlabs
from .low_rank import from_factors, truncated_factors

POLICIES = ("gpu-bf16", "gpu-int8", "cpu-pinned", "low-rank", "exact")
AUTO_ORDER = ("gpu-bf16", "gpu-int8", "cpu-pinned", "low-rank")

# HunyuanVideo-13B: hidden 3072 = 24 heads x 128, 20 double + 40 single joint blocks, 256 text tokens.
HUNYUAN_13B = dict(hidden=3072, heads=24, layers=60, txt_len=256)


def working_bytes(batch: int, tokens: int, hidden: int) -> int:
    """GPU memory a step still needs after the cache is placed: a refresh's float32 full / sparse / D
    temporaries and the blocks' own activations (the MLP's 4x hidden among them). 12 float32
    [B, L, hidden] tensors + 2 GiB matches the 19.8 GB the benchmark measured at 720p (1.46 GB each)."""
    return 12 * batch * tokens * hidden * 4 + (2 << 30)


def check_policy(policy: str) -> str:
    if policy not in POLICIES and policy != "auto":
        raise ValueError(f"unknown cache placement {policy!r}; choose one of {POLICIES + ('auto',)}")
    return policy


def cache_bytes(policy: str, tokens: int, hidden: int, layers: int, batch: int = 1, rank: int = 16,
                heads: Optional[int] = None, *, tensors: int = 1, factor_rank: int = 0) -> Tuple[int, int]:
    """(device bytes, host bytes) to keep `tensors` residuals of [batch, tokens, hidden] per layer.

    `rank` is the low-rank policy's rank; `factor_rank` > 0 adds SSAR's second-order SVD factors
    (U S [tokens, r] and V^T [r, head_dim] per head, bf16) that live next to each layer's cache.
    `heads` is needed for the per-head factor sizes (low-rank policy or factor_rank > 0).
    """
    check_policy(policy)
    if policy == "auto":
        raise ValueError("cache_bytes needs a concrete policy, not 'auto'")
    per_head = (rank > 0 and policy == "low-rank") or factor_rank > 0
    if per_head and (heads is None or hidden % heads):
        raise ValueError(f"heads must divide hidden {hidden} to size per-head factors, got {heads}")
    n = tokens * hidden
    if policy == "gpu-bf16" or policy == "cpu-pinned":
        one = 2 * n
    elif policy == "gpu-int8":
        one = n + 4 * tokens
    elif policy == "exact":
        one = 4 * n
    else:  # low-rank
        one = 2 * rank * (tokens + hidden // heads) * heads
    factors = 2 * factor_rank * (tokens + hidden // heads) * heads if factor_rank > 0 else 0
    total = layers * batch * (tensors * one + factors)
    return (0, total) if policy == "cpu-pinned" else (total, 0)


def choose_placement(tokens: int, hidden: int, layers: int, budget_bytes: Optional[int] = None, batch: int = 1,
                     rank: int = 16, heads: Optional[int] = None, *, host_budget_bytes: Optional[int] = None,
                     tensors: int = 1, factor_rank: int = 0) -> str:
    """Most accurate policy (gpu-bf16 > gpu-int8 > cpu-pinned > low-rank) whose device bytes fit
    `budget_bytes` (default: free CUDA memory, or unlimited without CUDA) and host bytes fit
    `host_budget_bytes` when given. Raises ValueError when nothing fits."""
    if budget_bytes is None:
        budget_bytes = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else math.inf
    need, pinned_host = [], None
    for policy in AUTO_ORDER:
        dev, host = cache_bytes(policy, tokens, hidden, layers, batch, rank, heads, tensors=tensors,
                                factor_rank=factor_rank)
        if dev <= budget_bytes and (host_budget_bytes is None or host <= host_budget_bytes):
            return policy
        if host == 0:
            need.append(dev)
        else:
            pinned_host = host
    host_part = "" if pinned_host is None else (
        f" or {pinned_host:,} bytes of host memory for cpu-pinned (budget "
        f"{'unlimited' if host_budget_bytes is None else format(host_budget_bytes, ',')})")
    raise ValueError(f"not enough memory for the SSAR cache: need at least {min(need):,} bytes of device memory "
                     f"(budget {budget_bytes:,}){host_part}; lower the resolution or use order=0")


def placement_table() -> List[Dict]:
    """Cache bytes per policy for HunyuanVideo-13B, 129 frames (33 latent), at 544p and 720p."""
    rows = []
    for name, (h, w) in (("544p", (544, 960)), ("720p", (720, 1280))):
        tokens = 33 * (h // 16) * (w // 16) + HUNYUAN_13B["txt_len"]
        for policy in AUTO_ORDER:
            dev, host = cache_bytes(policy, tokens, HUNYUAN_13B["hidden"], HUNYUAN_13B["layers"],
                                    heads=HUNYUAN_13B["heads"])
            total = dev + host
            rows.append(dict(resolution=name, tokens=tokens, policy=policy, device_bytes=dev, host_bytes=host,
                             per_layer_gb=total / HUNYUAN_13B["layers"] / 1e9, total_gb=total / 1e9))
    return rows


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device`; asynchronous only towards a CUDA device (stream-ordered there). A non-blocking
    copy to the host returns before the data has arrived, so those wait."""
    device = torch.device(device)
    return t.to(device, non_blocking=device.type == "cuda")


class CacheStore:
    """Keyed residual tensors [B, L, H*D] kept under one placement policy.

    put() takes fp32 (or any float) tensors on the compute device; get() returns fp32 on `device`.
    put_factors()/get_factors() keep small SVD factors in bf16 next to the cache (host for cpu-pinned).
    cpu-pinned entries live in HostSlabs; a key written again with the same shape is overwritten in place.
    """

    def __init__(self, policy: str, rank: int = 16):
        if check_policy(policy) == "auto":
            raise ValueError("resolve 'auto' with choose_placement before building a CacheStore")
        if policy == "low-rank" and rank < 1:
            raise ValueError(f"the low-rank placement needs rank >= 1, got {rank}")
        self.policy, self.rank = policy, rank
        self._data: Dict = {}
        self._ready: Dict = {}        # cpu-pinned entries already on their way to the GPU
        self._copy_stream = None
        self._slabs: Optional[HostSlabs] = None

    def _settle_prefetch(self, key) -> None:
        """Forget a prefetched copy of `key` (stale once the key changes); the compute stream waits for
        it, so the host bytes it reads are not overwritten or handed to another entry while it runs."""
        ready = self._ready.pop(key, None)
        if ready is not None:
            torch.cuda.current_stream(ready[0].device).wait_event(ready[1])

    def _host(self, x: torch.Tensor, old=None) -> HostEntry:
        """x as bf16 in host memory: written into `old` when it has the same shape, else a new entry."""
        x = x.to(torch.bfloat16)
        if self._slabs is None:
            self._slabs = HostSlabs(pin=torch.cuda.is_available())
        if isinstance(old, HostEntry) and old.fits(x):
            entry = old
        else:
            if isinstance(old, HostEntry):
                self._slabs.give_back(old.pieces)
            entry = HostEntry(self._slabs, x.shape, x.dtype)
        entry.write(x)
        return entry

    def _release(self, entry) -> None:
        """Give a dropped entry's host bytes back for reuse."""
        if entry is not None and self._slabs is not None:
            for part in entry[1:]:
                if isinstance(part, HostEntry):
                    self._slabs.give_back(part.pieces)

    @property
    def dense_dtype(self) -> Optional[torch.dtype]:
        """The dtype put() keeps a residual in as it is (a tensor already in it is stored without a copy or,
        cpu-pinned, copied to the host as it is); None where put() transforms it (fp32 clone, int8 codes,
        low-rank factors)."""
        return torch.bfloat16 if self.policy in ("gpu-bf16", "cpu-pinned") else None

    def put(self, key, x, heads: int) -> None:
        """Keep `x` [B, L, H*D] under `key` in this placement's form; gpu-int8 also takes the (codes, scale)
        that dispatch.int8_rows made of it (the refresh's one-pass residual)."""
        if isinstance(x, tuple):
            if self.policy != "gpu-int8":
                raise ValueError(f"pre-quantised int8 rows go to the gpu-int8 placement only, not {self.policy!r}")
        else:
            x = x.detach()
        if self.policy == "exact":
            entry = ("raw", x.float().clone())
        elif self.policy == "gpu-bf16":
            entry = ("raw", x.to(torch.bfloat16))
        elif self.policy == "cpu-pinned":
            self._settle_prefetch(key)  # a prefetched copy of the old value is stale
            old = self._data.get(key)
            entry = ("host", self._host(x, old[1] if old is not None and old[0] == "host" else None))
        elif self.policy == "gpu-int8":
            codes, scale = x if isinstance(x, tuple) else dispatch.int8_rows(x)[:2]
            entry = ("int8", codes.detach(), scale.detach())
        else:
            us, vh = truncated_factors(x, heads, self.rank)
            entry = ("lowrank", us.to(torch.bfloat16), vh.to(torch.bfloat16))
        self._data[key] = entry

    def prefetch(self, key, device) -> None:
        """cpu-pinned only: start copying `key` to a CUDA `device` on a side stream, so the transfer
        overlaps the compute of the layers before the one that needs it; get() then only waits
        for the copy's event. A no-op for other placements, missing keys and non-CUDA devices."""
        device = torch.device(device)
        if (self.policy != "cpu-pinned" or device.type != "cuda" or key not in self._data
                or key in self._ready or self._data[key][0] != "host"):
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        self._copy_stream.wait_stream(compute)   # the host copy was written by work queued on compute
        with torch.cuda.stream(self._copy_stream):
            on_device = self._data[key][1].read(device)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        self._ready[key] = (on_device, done)

    def get(self, key, device) -> torch.Tensor:
        """The residual as fp32 on `device`."""
        parts = self.get_parts(key, device)
        if "codes" in parts:
            return parts["codes"].float() * parts["scale"]
        return parts["dense"].float()

    def get_parts(self, key, device) -> Dict[str, torch.Tensor]:
        """The residual on `device` as stored, not expanded: {"dense": t} (bf16 / fp32) or
        {"codes": int8 [B, L, H*D], "scale": fp32 [B, L, 1]}; the low-rank policy's factors are
        expanded to dense. The sparse kernel adds either form in its epilogue."""
        if key in self._ready:
            on_device, _ = self._ready[key]
            self._settle_prefetch(key)   # the compute stream waits for the copy: used below, or discarded
            if on_device.device == torch.device(device):
                on_device.record_stream(torch.cuda.current_stream(on_device.device))  # made on the copy stream
                return {"dense": on_device}
        entry = self._data[key]
        if entry[0] == "host":
            return {"dense": entry[1].read(device)}
        if entry[0] == "raw":
            return {"dense": to_device(entry[1], device)}
        if entry[0] == "int8":
            return {"codes": entry[1].to(device), "scale": entry[2].to(device)}
        return {"dense": from_factors(entry[1].to(device), entry[2].to(device))}

    def put_factors(self, key, us: torch.Tensor, vh: torch.Tensor) -> None:
        if self.policy == "cpu-pinned":
            old = self._data.get(key)
            old = old[1:] if old is not None and old[0] == "factors" else (None, None)
            self._data[key] = ("factors", self._host(us, old[0]), self._host(vh, old[1]))
            return
        store = (lambda t: t.float().clone()) if self.policy == "exact" else (lambda t: t.to(torch.bfloat16))
        self._data[key] = ("factors", store(us), store(vh))

    def get_factors(self, key, device) -> Tuple[torch.Tensor, torch.Tensor]:
        _, us, vh = self._data[key]
        if isinstance(us, HostEntry):
            return us.read(device).float(), vh.read(device).float()
        return to_device(us, device).float(), to_device(vh, device).float()

    def __contains__(self, key) -> bool:
        return key in self._data

    def drop(self, key) -> None:
        self._settle_prefetch(key)
        self._release(self._data.pop(key, None))

    def clear(self) -> None:
        for key in list(self._ready):
            self._settle_prefetch(key)
        self._data.clear()
        self._slabs = None   # its slabs go back to PyTorch's pinned cache, for the next run to reuse

    def nbytes(self) -> int:
        """Bytes of data held (device and host together)."""
        return sum(t.nbytes if isinstance(t, HostEntry) else t.numel() * t.element_size()
                   for e in self._data.values() for t in e[1:])

    def host_reserved_bytes(self) -> int:
        """Host bytes this store keeps page-locked (its data, plus at most one partly used slab and freed runs)."""
        return 0 if self._slabs is None else self._slabs.reserved_bytes()

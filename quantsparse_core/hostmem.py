"""How much host memory a job may still take: what the OS has available plus the page-locked memory
PyTorch keeps cached from earlier runs (free for reuse, but counted as used by the OS)."""
from __future__ import annotations

import os
from typing import Optional

import torch

# Host memory left to everything else (ComfyUI, the OS, the browser) when a cache sizes itself from it.
HOST_RESERVE_BYTES = 4 << 30


def available_host_memory() -> Optional[int]:
    """Bytes of host memory available now (Linux MemAvailable: free pages plus reclaimable page cache, which after
    ComfyUI read a 28 GB file is most of it), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def cached_pinned_bytes() -> int:
    """Page-locked bytes PyTorch holds free for reuse (0 without CUDA or where the statistics are missing)."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return 0
    try:
        stats = torch.cuda.host_memory_stats()
        return max(0, int(stats.get("reserved_bytes.all.current", stats.get("reserved_bytes.current", 0)))
                   - int(stats.get("allocated_bytes.all.current", stats.get("allocated_bytes.current", 0))))
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return 0


def pinnable_host_bytes(reserve: int = HOST_RESERVE_BYTES) -> Optional[int]:
    """Bytes a page-locked cache may take now, leaving `reserve` to the rest of the machine; None if unknown."""
    avail = available_host_memory()
    return None if avail is None else max(0, avail + cached_pinned_bytes() - reserve)

"""How much host memory a job may still take: what the OS (or the container) has available plus the
page-locked memory PyTorch keeps cached from earlier runs (free for reuse, but counted as used)."""
from __future__ import annotations

import os
from typing import Optional

import torch

# Host memory left to everything else (ComfyUI, the OS, the browser) when a cache sizes itself from it.
HOST_RESERVE_BYTES = 4 << 30


def _meminfo_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (v2, else v1), None without a limit: in a container
    page-locked memory is charged to the cgroup, whose limit MemAvailable does not show."""
    for limit_path, usage_path in ((f"{root}/memory.max", f"{root}/memory.current"),
                                   (f"{root}/memory/memory.limit_in_bytes", f"{root}/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path) as f:
                limit = f.read().strip()
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:   # v1 "no limit" is a huge number
            return None
        return max(0, int(limit) - usage)
    return None


def available_host_memory() -> Optional[int]:
    """Bytes of host memory available now, or None where it cannot be read. Linux: MemAvailable (free pages plus
    reclaimable page cache, which after ComfyUI read a 28 GB file is most of it), capped by a container's
    cgroup limit; elsewhere (Windows, macOS) psutil's figure (ComfyUI depends on psutil), else sysconf."""
    avail = _meminfo_available()
    if avail is None:
        try:
            import psutil
            avail = int(psutil.virtual_memory().available)
        except Exception:  # psutil missing or failing: fall through
            try:
                avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return None
    room = _cgroup_room()
    return avail if room is None else min(avail, room)


def cached_pinned_bytes() -> int:
    """Page-locked bytes PyTorch holds free for reuse (0 without CUDA or where the statistics are missing).
    torch <= 2.9 reports reserved (owned) and allocated (in use) bytes; newer releases allocated (owned) and
    active (in use) bytes."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return 0
    try:
        stats = torch.cuda.host_memory_stats()
    except (RuntimeError, AttributeError, TypeError):
        return 0
    return cached_from_stats(stats)


def cached_from_stats(stats: dict) -> int:
    def get(name):
        return int(stats.get(f"{name}.all.current", stats.get(f"{name}.current", 0)))
    if any(k.startswith("active_bytes") for k in stats):
        return max(0, get("allocated_bytes") - get("active_bytes"))
    return max(0, get("reserved_bytes") - get("allocated_bytes"))


def pinnable_host_bytes(reserve: int = HOST_RESERVE_BYTES) -> Optional[int]:
    """Bytes a page-locked cache may take now, leaving `reserve` to the rest of the machine; None if unknown."""
    avail = available_host_memory()
    return None if avail is None else max(0, avail + cached_pinned_bytes() - reserve)

"""What holds GPU memory at a run's peak: torch's allocator history replayed to the moment of the
highest allocated total, the tensors alive then grouped by the code that allocated them.

Used by comfy_product.py --memory-profile (a diagnostic for the memory tiers: which temporaries to
chunk or free first); `summarize` is pure Python over torch.cuda.memory._snapshot()'s dict, so it is
tested on the CPU with a synthetic trace.
"""
from __future__ import annotations

from collections import defaultdict

OURS = ("quantsparse_core/", "kernels/", "nodes/", "benchmarks/", "comfy/", "comfy_extras/")


def start(max_entries: int = 400_000) -> bool:
    """Begin recording allocations with Python stacks; False where torch or the device cannot."""
    import torch
    if not torch.cuda.is_available():
        return False
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    return True


def stop_and_summarize(top: int = 25) -> dict:
    import torch
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return summarize(snap, top)


def _site(frames) -> str:
    """The innermost frame in our code or ComfyUI's (file:line function), else the innermost frame."""
    for f in frames or []:
        name = f.get("filename", "")
        if any(part in name for part in OURS) and "memory_peak" not in name:
            short = name.split("/")[-2:] if "/" in name else [name]
            return f"{'/'.join(short)}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"{f.get('filename', '?').split('/')[-1]}:{f.get('line')} {f.get('name')}"
    return "(no stack)"


def summarize(snapshot: dict, top: int = 25) -> dict:
    """{peak_gb, events, dropped_before_gb, groups: [{site, gb, count}]} at the peak of the replayed
    device trace. Allocations made before recording began (the model's weights, mostly) are not in
    the trace: their size is reported as `untraced_gb` from the segments at snapshot time minus what
    the trace saw alive at its end, an estimate."""
    traces = snapshot.get("device_traces") or [[]]
    events = max(traces, key=len)
    live, total, peak, peak_i = {}, 0, 0, -1
    for i, e in enumerate(events):
        act, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
        if act == "alloc":
            live[addr] = size
            total += size
        elif act in ("free_completed",) and addr in live:
            total -= live.pop(addr)
        if total > peak:
            peak, peak_i = total, i
    alive = {}
    for e in events[:peak_i + 1]:
        act, addr = e.get("action"), e.get("addr")
        if act == "alloc":
            alive[addr] = e
        elif act == "free_completed":
            alive.pop(addr, None)
    groups = defaultdict(lambda: [0, 0])
    for e in alive.values():
        g = groups[_site(e.get("frames"))]
        g[0] += int(e.get("size", 0))
        g[1] += 1
    rows = sorted(({"site": s, "gb": round(b / 1e9, 3), "count": n} for s, (b, n) in groups.items()),
                  key=lambda r: -r["gb"])
    segments = sum(int(s.get("allocated_size", 0)) for s in snapshot.get("segments", []))
    return dict(traced_peak_gb=round(peak / 1e9, 3), events=len(events), peak_event=peak_i,
                allocated_at_snapshot_gb=round(segments / 1e9, 3),
                untraced_gb=round(max(0, segments - total) / 1e9, 3), groups=rows[:top])


__all__ = ["start", "stop_and_summarize", "summarize"]

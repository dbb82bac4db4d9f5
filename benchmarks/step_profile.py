"""Per-step torch.profiler summaries for the product benchmark (`comfy_product.py --profile-steps`).

Why: a step's wall-clock says how long it took, not where the time went. Two open questions need the
breakdown (2026-12-07): (QM)'s merged refresh saved 0.14 s per 720p refresh step where the kernel alone
predicts ~1 s, and a refresh step costs 3.6-4.7 s over a dense one. The summary lists the operators with
the most device time, the host-side operations that wait for the device (each one drains the launch
queue, so the GPU idles while the host catches up), and how much of the step's wall-clock the device was
busy. The profiler slows the host side: profiled steps are diagnostics, not timings to quote.
"""
from __future__ import annotations

import time

import torch

# Host operations that block until the device has caught up: an item()/tolist()/int() of a device tensor
# (_local_scalar_dense), data-dependent shapes (nonzero), explicit synchronisation, device-to-host copies.
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def _device_us(avg) -> float:
    """Self device time (us) of a key_averages() row, whatever this torch version calls it."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(avg, name, None)
        if v is not None:
            return float(v)
    return 0.0


OUR_CODE = ("quantsparse_core/", "nodes/", "kernels/", "benchmarks/", "tests/")  # frames that name who asked for a sync


def _python_frame(name: str) -> bool:
    return "): " in name and "(" in name and not name.startswith("<")


def _caller(event) -> str:
    """The innermost frame of this repository's code that led to `event`, else its innermost Python frame: from
    the recorded stack where the profiler keeps one per event, else by walking up the Python-function events
    that with_stack adds to the tree (torch 2.9+)."""
    frames = [f for f in (getattr(event, "stack", None) or []) if _python_frame(f)]
    if not frames:
        parent = event.cpu_parent
        while parent is not None:
            if _python_frame(parent.name):
                frames.append(parent.name)
            parent = parent.cpu_parent
    ours = [f for f in frames if any(part in f for part in OUR_CODE)]
    return (ours or frames or ["?"])[0]


def sync_sources(prof, top: int = 10) -> list:
    """Where the host syncs come from: the aten-level SYNC_OPS events (the CUDA runtime calls below them carry no
    Python frames) counted by their caller (_caller). Needs a profile taken with_stack=True; else all "?"."""
    counts = {}
    for e in prof.events():
        if e.name.startswith("aten::") and e.name in SYNC_OPS and e.name != "aten::item":  # item wraps the read
            key = (e.name, _caller(e))
            counts[key] = counts.get(key, 0) + 1
    rows = [dict(op=op, where=where, count=n) for (op, where), n in counts.items()]
    return sorted(rows, key=lambda r: -r["count"])[:top]


def summarize(prof, wall_s: float, top: int = 20) -> dict:
    """The profile of one step: operators by self device time (CPU time where there is no device), counts of
    SYNC_OPS (and, with stacks recorded, where they come from), and the device's busy time (its kernels' summed
    durations) against the step's wall-clock."""
    rows = []
    syncs = {}
    for avg in prof.key_averages():
        dev = _device_us(avg)
        rows.append(dict(op=avg.key, count=int(avg.count), device_ms=round(dev / 1e3, 3),
                         cpu_ms=round(float(avg.self_cpu_time_total) / 1e3, 3)))
        if avg.key in SYNC_OPS:
            syncs[avg.key] = syncs.get(avg.key, 0) + int(avg.count)
    on_device = any(r["device_ms"] > 0 for r in rows)
    rows.sort(key=lambda r: r["device_ms"] if on_device else r["cpu_ms"], reverse=True)
    busy_ms = None
    if on_device:
        busy_ms = sum(e.time_range.elapsed_us() for e in prof.events()
                      if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) / 1e3
    return dict(wall_s=round(wall_s, 3), device_busy_ms=None if busy_ms is None else round(busy_ms, 1),
                device_busy_fraction=None if busy_ms is None or wall_s <= 0 else round(busy_ms / 1e3 / wall_s, 3),
                syncs=syncs, sync_sources=sync_sources(prof), top=rows[:top],
                sorted_by="device_ms" if on_device else "cpu_ms")


class StepProfiler:
    """Profiles the listed steps of a sampling run: begin(i) before step i's first model call (for step 0,
    before sampling starts; else at step i-1's end), end(i) at step i's end. Summaries are made after the
    run (summarize() takes seconds at 720p and would otherwise land in the next step's time)."""

    def __init__(self, steps, cuda: bool):
        self.steps = set(int(s) for s in steps)
        self.cuda = cuda
        self.active = None  # (step, profiler, start time)
        self.done = {}      # step -> (profiler, wall seconds)

    def begin(self, i: int) -> None:
        if i not in self.steps or self.active is not None:
            return
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=acts, with_stack=True)  # sync_sources names the callers
        prof.start()
        self.active = (i, prof, time.perf_counter())

    def end(self, i: int) -> None:
        if self.active is None or self.active[0] != i:
            return
        _, prof, t0 = self.active
        if self.cuda:
            torch.cuda.synchronize()
        prof.stop()
        self.done[i] = (prof, time.perf_counter() - t0)
        self.active = None

    def close(self) -> None:
        """Stop a profile left running (a run that failed or stopped mid-step)."""
        if self.active is not None:
            self.active[1].stop()
            self.active = None

    def summaries(self, top: int = 20) -> dict:
        return {str(i): summarize(prof, wall, top) for i, (prof, wall) in sorted(self.done.items())}

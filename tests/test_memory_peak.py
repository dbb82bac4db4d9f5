"""benchmarks/memory_peak.py: the allocator trace replayed to its peak, on a synthetic trace."""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_peak  # noqa: E402


def _frames(site):
    return [{"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
            {"filename": f"/repo/nodes/{site}.py", "line": 7, "name": site}]


def test_summary_lists_what_is_alive_at_the_peak():
    rng = random.Random()
    sizes = {s: rng.randrange(1, 10**6) for s in "abcd"}
    # a and b alive together make the peak; c comes after b is freed; d never overlaps a peak
    ev = [dict(action="alloc", addr=1, size=sizes["a"], frames=_frames("a")),
          dict(action="alloc", addr=2, size=sizes["b"] + 2 * 10**6, frames=_frames("b")),
          dict(action="free_requested", addr=2, size=sizes["b"] + 2 * 10**6),
          dict(action="free_completed", addr=2, size=sizes["b"] + 2 * 10**6),
          dict(action="alloc", addr=3, size=sizes["c"], frames=_frames("c")),
          dict(action="free_completed", addr=1, size=sizes["a"]),
          dict(action="alloc", addr=4, size=sizes["d"], frames=_frames("d"))]
    out = memory_peak.summarize({"device_traces": [ev], "segments": []})
    assert out["peak_event"] == 1
    assert abs(out["traced_peak_gb"] - round((sizes["a"] + sizes["b"] + 2 * 10**6) / 1e9, 3)) < 1e-9
    sites = {g["site"].split(" ")[-1]: g for g in out["groups"]}
    assert set(sites) == {"a", "b"}
    assert sites["b"]["site"].startswith("nodes/b.py:7")

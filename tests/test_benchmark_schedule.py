"""The GPU benchmark's 50-step accounting (benchmarks/gpu_benchmark.py, which needs a GPU to run) is
plain Python: the step kinds it times and weights must follow SSARAttention's schedule."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_benchmark as gb  # noqa: E402


def test_default_schedule_counts():
    kinds, warm = gb.schedule(gb.SparseSettings())
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert warm == 5 and len(kinds) == 50
    assert counts == {"dense": 5, "refresh1": 1, "refresh2": 8, "reuse": 4, "reuse2a": 8, "reuse2": 24}
    assert kinds[5] == "refresh1" and kinds[6:10] == ["reuse"] * 4
    assert kinds[10:15] == ["refresh2", "reuse2a", "reuse2", "reuse2", "reuse2"]


@pytest.mark.parametrize("tau", gb.WHATIF_TAUS + (1, 2))
@pytest.mark.parametrize("warmup", gb.WHATIF_WARMUPS + (0,))
def test_what_if_schedules_use_only_measured_kinds(tau, warmup):
    """Every step kind of another schedule is one the benchmark times; refreshes land every tau steps."""
    kinds, warm = gb.schedule(gb.SparseSettings(tau=tau, warmup_steps=warmup))
    assert set(kinds) <= {"dense", "refresh1", "refresh2"} | set(gb.REUSE_KINDS)
    refreshes = [i for i, k in enumerate(kinds) if k.startswith("refresh")]
    assert refreshes == list(range(warm, 50, tau)) and kinds.count("refresh1") == 1
    for i, k in enumerate(kinds):
        if k == "reuse2a":
            assert kinds[i - 1] == "refresh2"
        if k == "reuse":
            assert "refresh2" not in kinds[:i]


def test_first_order_schedule_has_no_second_order_kinds():
    kinds, _ = gb.schedule(gb.SparseSettings(order=1))
    assert "refresh2" not in kinds and "reuse2" not in kinds and "reuse2a" not in kinds

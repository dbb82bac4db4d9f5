"""The GPU benchmark's 50-step accounting (benchmarks/gpu_benchmark.py, which needs a GPU to run) is
plain Python: the step kinds it times and weights must follow SSARAttention's schedule."""
import sys
from pathlib import Path

import pytest
import torch

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


def _run(config, kinds, seconds, schedule_kinds, steps=50):
    import comfy_product as cp  # noqa: F401  (benchmarks/ is on sys.path above)
    per = [dict(i=i, s=s, kind=k) for i, (k, s) in enumerate(zip(kinds, seconds))]
    per_kind = {k: dict(median_s=sorted(s for kk, s in zip(kinds, seconds) if kk == k)[
        (kinds.count(k) - 1) // 2]) for k in set(kinds)}
    return dict(config=config, resolution="720p", cap_gb=None, completed=True, per_step=per, per_kind=per_kind,
                schedule_steps=steps, schedule_kinds=schedule_kinds, loras={"count": 3})


def test_lora_target_counts_the_worst_step_kind_of_a_partial_run():
    """A run timed over the first steps of the 50-step plan: every kind's median ratio must be within the
    target, not only the sum over the (dense-heavy) steps timed; a kind not timed leaves the row unmet."""
    import comfy_product as cp
    kinds = ["dense"] * 5 + ["refresh"] + ["reuse"] * 4 + ["refresh", "reuse"]
    counts = {"dense": 5, "refresh": 9, "reuse": 36}
    q = [20.0] * 5 + [25.0] + [5.0] * 4 + [25.0, 5.0]
    ql = [20.6] * 5 + [25.7] + [5.6] * 4 + [25.7, 5.6]          # reuse +12%: over the 10% line
    row = cp.lora_target([_run("Q", kinds, q, counts), _run("QL", kinds, ql, counts)])
    assert row["measured"] == pytest.approx(1.12, abs=1e-3) and not row["met"]
    weighted = (5 * 20.6 + 9 * 25.7 + 36 * 5.6) / (5 * 20.0 + 9 * 25.0 + 36 * 5.0)
    assert f"{weighted:.3f}" in row["note"] and f"{sum(ql) / sum(q):.3f}" in row["note"]
    ql_ok = [x * 1.05 for x in q]
    assert cp.lora_target([_run("Q", kinds, q, counts), _run("QL", kinds, ql_ok, counts)])["met"]
    short = cp.lora_target([_run("Q", kinds[:6], q[:6], counts), _run("QL", kinds[:6], ql_ok[:6], counts)])
    assert not short["met"] and "not every step kind timed" in short["note"]


def test_lora_target_compares_a_cut_off_run_over_the_steps_both_timed(rng):
    """(QL) stopped by the time limit one step short: the kinds' medians come from the steps both runs timed
    (a slow last step of (Q), here a kernel compile, is not compared with nothing), and the note says which
    run stopped. Random step times, medians checked against statistics.median on the common steps."""
    import statistics
    import comfy_product as cp
    kinds = ["dense"] * 5 + ["refresh"] + ["reuse"] * 4 + ["refresh", "reuse"]
    counts = {"dense": 5, "refresh": 9, "reuse": 36}
    base = {"dense": 20.0, "refresh": 25.0, "reuse": 5.6}
    q = [base[k] * (1 + 0.02 * float(torch.rand(1, generator=rng))) for k in kinds]
    q[-1] = 9.0                                                   # (Q)'s last step compiled a kernel
    ql = [x * (1.02 + 0.05 * float(torch.rand(1, generator=rng))) for x in q[:-1]]
    cut = _run("QL", kinds[:-1], ql, counts)
    cut.update(completed=False, timed_steps=12)
    row = cp.lora_target([_run("Q", kinds, q, counts), cut])
    ratios = {k: statistics.median(b for kk, b in zip(kinds[:-1], ql) if kk == k)
              / statistics.median(a for kk, a in zip(kinds[:-1], q[:-1]) if kk == k) for k in base}
    assert row["measured"] == pytest.approx(max(ratios.values()), abs=1e-3)
    assert row["met"] == (max(ratios.values()) <= 1.10)
    assert "(QL) stopped after 11 of its 12 timed steps" in row["note"] and "steps 0-10" in row["note"]

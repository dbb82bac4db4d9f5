"""The results command replaces only its own section of docs/RESULTS.md."""
from quantsparse_core.results import replace_section


def test_replace_section_keeps_other_tables(tmp_path):
    path = tmp_path / "R.md"
    replace_section(path, "## Sparse attention\n\n| a |\n")
    replace_section(path, "## Quantization\n\n| q1 |\n\n### notes\nold\n")
    replace_section(path, "## Quantization\n\n| q2 |\n")
    text = path.read_text()
    assert text.startswith("# Fidelity results")
    assert "| q2 |" in text and "| q1 |" not in text and "old" not in text
    assert "| a |" in text and text.index("## Quantization") < text.index("## Sparse attention")


def test_sparse_runs_and_render_split_by_step_count():
    """Every sparse setting appears at the main step count and at ABLATION_STEPS, densities below 20%
    use 64-token blocks (reachable on the tiny model), and the table groups rows by step count."""
    from quantsparse_core.results import ABLATION_STEPS, SCHEDULES, _sparse_runs, render_sparse
    runs = _sparse_runs(16)
    by_steps = {n: [r for r in runs if r[6] == n] for n in (16, ABLATION_STEPS)}
    extra = len(SCHEDULES)  # shorter dense shares, at ABLATION_STEPS only
    assert len(by_steps[16]) == 19 and len(by_steps[ABLATION_STEPS]) == 19 + extra
    assert all(r[5] == (64 if r[1] < 0.2 else 128) for r in runs)
    assert [(r[4], r[7]) for r in runs if len(r) == 8] == list(SCHEDULES)
    rows = [(r[6], r[5], r[0], 30.0 + i, 0.9, 0.5, 1.0) for i, r in enumerate(runs)]
    text = render_sparse(rows, "cpu", 16)
    part16, part50 = text.split(f"### {ABLATION_STEPS} steps")
    assert "### 16 steps" in part16 and part16.count("\n| d=") == 19 and part50.count("\n| d=") == 19 + extra
    assert f"| d=10% 1st order | 64 | {30.0 + 13:.2f} |" in part16

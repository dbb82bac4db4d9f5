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

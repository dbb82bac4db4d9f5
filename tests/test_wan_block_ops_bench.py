"""benchmarks/wan_block_ops_bench.py runs at its small size (Triton interpreter on the CPU): every row's kernel agrees
with the unfused sequence it replaces, and the JSON carries each row."""
import json
import sys
from pathlib import Path

from kernel_marks import interpreted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@interpreted
def test_small_run_agrees_and_writes_json(tmp_path):
    import wan_block_ops_bench as bench
    out = tmp_path / "w.json"
    assert bench.main(["--size", "small", "--reps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["op"].split(" (")[0].split(",")[0] for r in data["rows"]] == ["q/k RMSNorm + RoPE", "q/k/v input",
                                                                           "q/k/v input"]
    assert all(r["agree"] and r["unfused_ms"] > 0 and r["fused_ms"] > 0 for r in data["rows"])
    assert data["tokens"] == 24 and data["width"] == 256

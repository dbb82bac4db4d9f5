"""The streaming-calibration benchmark runs end to end at the test size and writes its JSON schema."""
import json

from benchmarks.calibration_streaming import main


def test_benchmark_runs_at_test_size_and_writes_targets(tmp_path):
    out = tmp_path / "r.json"
    main(["--preset", "test", "--samples", "2", "--epochs", "1", "--steps", "2", "--blocks", "2",
          "--capture-budget-s", "1", "--device", "cpu", "--workdir", str(tmp_path), "--out", str(out)])
    res = json.loads(out.read_text())
    assert [t["name"] for t in res["targets"]] == ["peak GPU memory (GB)", "peak host memory (GB)",
                                                  "projected calibration time on one H200 (h)"]
    for t in res["targets"]:
        assert set(t) == {"name", "measured", "target", "met"} and isinstance(t["met"], bool)
    assert set(res["blocks"]) == {"double_blocks.0", "single_blocks.0"}
    assert all(b["phase"] == "calibrated" for b in res["blocks"].values())
    assert res["capture"]["forwards_full"] == 2 and res["projected"]["total_h"] > 0

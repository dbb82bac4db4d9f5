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


def test_random_source_makes_each_block_on_request_identically():
    """The benchmark's source holds no weights: a block made on request (block()) equals the one from
    tensors(), and another seed gives other weights."""
    import torch

    from benchmarks.calibration_streaming import RandomSource
    from quantsparse_core.models.config import get_preset

    src = RandomSource(get_preset("test"), seed=3, dtype=torch.float32)
    blk = src.block("double", 0, "cpu")
    again = src.tensors("double", 0)
    for k, v in blk.state_dict().items():
        assert torch.equal(v, again[k]), k
    other = RandomSource(get_preset("test"), seed=4, dtype=torch.float32).tensors("double", 0)
    assert any(not torch.equal(other[k], again[k]) for k in again if again[k].ndim == 2)

"""benchmarks/dev_profile_calib.py runs its CPU smoke mode end to end: both blocks, both loop modes, the
profile tables and the JSON; on the CPU the two modes train to the same losses, bit for bit."""
import json
import math

from benchmarks.dev_profile_calib import main


def test_profile_tool_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "p.json"
    res = main(["--preset", "test", "--tokens", "64", "--samples", "2", "--steps", "2", "--warmup", "0",
                "--disk", "all", "--device", "cpu", "--workdir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["tokens"] == 64 and res["txt_len"] == 16 and res["steps_per_mode"] == 2
    assert set(res["blocks"]) == {"double", "single"}
    for kind, blk in res["blocks"].items():
        before, after = blk["modes"]["before"], blk["modes"]["after"]
        for m in (before, after):
            assert m["steps"] == 2 and len(m["step_s"]) == 2 and all(s > 0 for s in m["step_s"])
            assert set(m["final_losses"]) == {"final_quant", "final_global", "final_local"}
            assert all(math.isfinite(v) and v >= 0 for v in m["final_losses"].values())
            assert m["final_losses"]["final_quant"] > 0   # (64 tokens pool to one window: global is 0)
        assert before["final_losses"] == after["final_losses"], kind   # same data, same order, same ops
        prof = blk["profile"]["profile"]
        assert prof["busy_ms"] > 0 and prof["kernels"] and any(k["name"] == "aten::mm" for k in prof["kernels"])
        assert abs(sum(prof["families"].values()) - prof["busy_ms"] - prof["copy_ms"]) < 1e-6 * prof["busy_ms"] + 1e-9
    printed = capsys.readouterr().out
    assert "## double block" in printed and "## single block" in printed and "| top kernel |" in printed
    assert not list(tmp_path.glob("qs-prof-*/*.bin"))   # the stores it wrote are gone

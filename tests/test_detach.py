"""benchmarks/detach.py: a detached run's exit status, log and files come back through `wait`; a run still going
is reported as such (and not restarted under its name); a failing command's status is its own."""
import os
import random
import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import detach  # noqa: E402


def test_detached_run_reports_its_status_log_and_files(tmp_path, capsys):
    token, code = f"{random.getrandbits(48):x}", random.choice([3, 4, random.randint(5, 60)])  # 3, 4: pytest's own
    made = tmp_path / "result.json"
    script = (f"import time, pathlib; time.sleep(0.3); print({token!r}, flush=True); "
              f"pathlib.Path({str(made)!r}).write_text('{{}}'); raise SystemExit({code})")
    detach.start(tmp_path / "runs", "job", [sys.executable, "-c", script])
    out = tmp_path / "out"
    rc = detach.wait(tmp_path / "runs", "job", for_s=60, copy_to=out, files=[str(made)], tail=5, poll_s=0.05)
    printed = capsys.readouterr().out
    assert rc == code and token in printed and f"exit status {code}" in printed
    assert token in (out / "job.log").read_text() and (out / "result.json").read_text() == "{}"


def test_a_run_still_going_is_reported_and_not_restarted(tmp_path, capsys):
    pid = detach.start(tmp_path, "long", [sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert detach.wait(tmp_path, "long", for_s=0.3, copy_to=tmp_path / "out", files=[], tail=1,
                           poll_s=0.05) == detach.STILL_RUNNING
        assert "still running" in capsys.readouterr().out and not (tmp_path / "out").exists()
        with pytest.raises(SystemExit, match="still running"):
            detach.start(tmp_path, "long", [sys.executable, "-c", "pass"])
    finally:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_missing_program_and_bad_names_fail_clearly(tmp_path):
    detach.start(tmp_path, "nope", [str(tmp_path / "no-such-program")])
    assert detach.wait(tmp_path, "nope", for_s=60, copy_to=None, files=[], tail=5, poll_s=0.05) == 127
    assert "could not run" in (tmp_path / "nope.log").read_text()
    with pytest.raises(SystemExit, match="plain file name"):
        detach.start(tmp_path, "../x", [sys.executable, "-c", "pass"])
    with pytest.raises(SystemExit, match="start it first"):
        detach.wait(tmp_path, "never", for_s=1, copy_to=None, files=[], tail=1)


def test_a_signal_kill_reads_as_128_plus_the_signal(tmp_path, capsys):
    detach.start(tmp_path, "killed", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert detach.wait(tmp_path, "killed", for_s=60, copy_to=None, files=[], tail=0, poll_s=0.05) == 128 + signal.SIGTERM
    assert capsys.readouterr().out.strip() == f"detach: killed ended with exit status {128 + signal.SIGTERM}"


def test_wait_takes_its_files_before_or_after_the_options(tmp_path, capsys):
    """The recipe's `wait NAME --for-s 560 --copy $OUT FILE` once failed in argparse and lost a GPU run."""
    name = f"j{random.getrandbits(24):x}"
    made = tmp_path / f"{name}.json"
    detach.start(tmp_path / "runs", name, [sys.executable, "-c", f"open({str(made)!r}, 'w').write('[1]')"])
    out = tmp_path / "out"
    rc = detach.main(["--dir", str(tmp_path / "runs"), "wait", name, "--for-s", "60", "--copy", str(out),
                      str(made), "--tail", "0"])
    assert rc == 0 and (out / made.name).read_text() == "[1]"
    with pytest.raises(SystemExit):
        detach.main(["--dir", str(tmp_path / "runs"), "wait", name, "--no-such-option"])

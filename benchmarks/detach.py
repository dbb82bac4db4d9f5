"""Run a long GPU command across several device calls: start it detached, wait for it in the next call.

    python3 benchmarks/detach.py start NAME -- python3 benchmarks/gpu_benchmark.py --product ... --out /tmp/NAME.json
    python3 benchmarks/detach.py wait NAME --for-s 560 --copy "$OUT" /tmp/NAME.json

A device call ends after at most 600 s, but a process in its own session outlives the call while the machine
stays warm (30 s idle), so a 15-minute run spans two calls. `start` launches the command in a new session with
its output in DIR/NAME.log and its exit status, once it ends, in DIR/NAME.rc; `wait` blocks until that file
exists or --for-s seconds pass, prints the log's tail, and once the run has ended copies the log and the named
files to --copy. Why not `pgrep -f`: a pattern matches every shell whose command line holds the word, the
waiting shell's own included (2026-12-06: two calls, 1000 s of device time, lost that way).

Exit status of `wait`: the command's own once it has ended (128 + N if signal N killed it), 75 while it still
runs, 76 if it died without recording its status; the last line printed says which ("detach: NAME ...").
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

STILL_RUNNING, VANISHED = 75, 76  # outside the range commands use for themselves (pytest: 0-5)
DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "quantsparse_detached"


def paths(directory: Path, name: str) -> dict:
    if not name or "/" in name or name.startswith("."):
        raise SystemExit(f"run name {name!r}: use a plain file name (letters, digits, - and _)")
    return {k: directory / f"{name}.{k}" for k in ("log", "pid", "rc")}


def start(directory: Path, name: str, command: list) -> int:
    """Launch `command` detached (new session, stdin closed); returns its pid. Refuses a name still running."""
    if not command:
        raise SystemExit("nothing to run: give the command after --")
    p = paths(directory, name)
    directory.mkdir(parents=True, exist_ok=True)
    if p["pid"].exists() and not p["rc"].exists() and _alive(int(p["pid"].read_text())):
        raise SystemExit(f"{name} is still running (pid {p['pid'].read_text().strip()}): wait for it or pick another name")
    for f in p.values():
        f.unlink(missing_ok=True)
    with open(p["log"], "wb") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_supervise", str(directory), name, "--",
                                 *command], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _write(p["pid"], proc.pid)
    return proc.pid


def supervise(directory: Path, name: str, command: list) -> int:
    """Runs the command (output inherited: the log) and records its exit status atomically when it ends."""
    p = paths(directory, name)
    _write(p["pid"], os.getpid())  # again, in case start was interrupted before it wrote it
    try:
        rc = subprocess.call(command)
    except OSError as e:
        print(f"detach: could not run {command[0]!r}: {e}", flush=True)
        rc = 127
    if rc < 0:  # killed by signal -rc: the shell's convention
        rc = 128 - rc
    _write(p["rc"], rc)
    return rc


def _write(path: Path, value: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n")
    tmp.replace(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of this very process counts as ended
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def wait(directory: Path, name: str, for_s: float, copy_to, files: list, tail: int, poll_s: float = 2.0) -> int:
    p = paths(directory, name)
    if not p["pid"].exists():
        raise SystemExit(f"no run named {name} in {directory}: start it first")
    pid = int(p["pid"].read_text())
    deadline = time.monotonic() + for_s
    while not p["rc"].exists() and _alive(pid) and time.monotonic() < deadline:
        time.sleep(poll_s)
    if p["rc"].exists():
        rc = int(p["rc"].read_text())
        state = f"ended with exit status {rc}"
    elif _alive(pid):
        rc, state = STILL_RUNNING, "still running"
    elif p["rc"].exists():  # it ended between the two checks
        rc = int(p["rc"].read_text())
        state = f"ended with exit status {rc}"
    else:
        rc, state = VANISHED, "ended without recording its exit status"
    ended = state != "still running"
    lines = p["log"].read_text(errors="replace").splitlines() if p["log"].exists() else []
    if tail > 0:
        print("\n".join(lines[-tail:]))
    print(f"detach: {name} {state}", flush=True)
    if ended and copy_to:
        dest = Path(copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for f in [p["log"], *map(Path, files)]:
            if f.is_file():
                shutil.copy2(f, dest / f.name)
            else:
                print(f"detach: {f} not written", flush=True)
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    if argv[:1] == ["_supervise"]:
        return supervise(Path(argv[1]), argv[2], command)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the log, pid and exit status live")
    sub = ap.add_subparsers(dest="action", required=True)
    s = sub.add_parser("start", help="launch `-- COMMAND...` detached")
    s.add_argument("name")
    w = sub.add_parser("wait", help="wait for a started run, print its log's tail, copy its files once ended")
    w.add_argument("name")
    w.add_argument("--for-s", type=float, default=560.0, help="wait at most this long (a device call has 600 s)")
    w.add_argument("--copy", default=None, help="folder to copy the log and FILES to once the run has ended ($OUT)")
    w.add_argument("--tail", type=int, default=40, help="log lines to print")
    w.add_argument("files", nargs="*", help="files the run writes (its --out), copied with the log")
    a, extra = ap.parse_known_args(argv)  # argparse alone refuses FILES after an option (`--copy $OUT out.json`)
    if extra and (a.action != "wait" or any(x.startswith("-") for x in extra)):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if a.action == "wait":
        a.files = list(a.files) + extra
    if a.action == "start":
        print(f"detach: {a.name} started, pid {start(a.dir, a.name, command)}; log {paths(a.dir, a.name)['log']}")
        return 0
    if command:
        ap.error("wait takes no command")
    return wait(a.dir, a.name, a.for_s, a.copy, a.files, a.tail)


if __name__ == "__main__":
    sys.exit(main())

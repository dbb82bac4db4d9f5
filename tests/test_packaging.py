"""The core imports without ComfyUI; the package metadata is what Manager and pip need."""
import logging
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_core_import_does_not_import_comfyui():
    code = ("import sys, quantsparse_core, quantsparse_core.models, quantsparse_core.quant.linear, "
            "quantsparse_core.calib.calibrate, quantsparse_core.io, quantsparse_core.sparse, "
            "quantsparse_core.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pyproject_never_pins_torch_and_has_comfy_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    torch_dep = [d for d in deps if d.replace(" ", "").startswith("torch")]
    assert torch_dep == ["torch>=2.4"]          # a lower bound only: ComfyUI owns torch
    assert {"PublisherId", "DisplayName"} <= set(meta["tool"]["comfy"])
    assert "models/tiny/*.safetensors" in meta["tool"]["setuptools"]["package-data"]["quantsparse_core"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    test_cmd = next(line.split("#")[0].strip() for line in readme[:10] if "tests" in line and line.startswith("./"))
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci == [test_cmd]


def test_the_wheel_ships_every_package_and_the_kernels_under_their_own_name():
    """pip installs every quantsparse_core package and kernels/ as `quantsparse_kernels` (a PyPI
    package called `kernels` exists): a wheel without them would silently run the slow references."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "quantsparse_core").rglob("__init__.py")}
    assert set(tool["packages"]) == found | {"quantsparse_kernels"}
    assert tool["package-dir"] == {"quantsparse_kernels": "kernels"}
    assert (ROOT / "LICENSE").read_text().startswith("\n                                 Apache License") or \
        "Apache License" in (ROOT / "LICENSE").read_text()[:200]


def _triton_requirements():
    """The Triton lines of requirements.txt (what ComfyUI Manager installs) and of the `kernels` extra."""
    from packaging.requirements import Requirement  # pytest depends on packaging: always here

    lines = [l.split("#")[0].strip() for l in (ROOT / "requirements.txt").read_text().splitlines()]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["kernels"]
    return {"requirements.txt": [Requirement(l) for l in lines if l.startswith("triton")],
            "pyproject [kernels]": [Requirement(s) for s in extra if s.startswith("triton")]}


@pytest.mark.parametrize("platform, wanted", [("linux", {"triton"}), ("win32", {"triton-windows"}), ("darwin", set())])
def test_triton_markers_install_one_triton_per_platform(platform, wanted):
    """Windows gets triton-windows, Linux triton, macOS neither (no CUDA there): a wrong marker means
    no fast kernels on Windows, or an install that fails on macOS."""
    for where, reqs in _triton_requirements().items():
        got = {r.name for r in reqs if r.marker is None or r.marker.evaluate({"sys_platform": platform})}
        assert got == wanted, (where, platform, [str(r) for r in reqs])


def test_references_on_cuda_are_logged_once(monkeypatch, caplog):
    """A CUDA run without Triton is correct but slow: the user is told once, not once per call, and
    not for CPU tensors or QUANTSPARSE_KERNELS=torch (both expected to take the references)."""
    from quantsparse_core import dispatch

    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "_fallback_logged", False)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    caplog.set_level(logging.INFO, logger="quantsparse")
    assert dispatch.producer_quant_kernels("cpu") is None
    with dispatch.forced("torch"):
        assert dispatch.producer_quant_kernels("cuda") is None
    assert caplog.records == []
    for _ in range(3):
        assert dispatch.quantized_linear_kernels("cuda") is None
        assert dispatch.producer_quant_kernels(torch.device("cuda", 0)) is None
    (record,) = caplog.records
    assert record.name == "quantsparse" and record.levelno == logging.WARNING
    assert "Triton does not import" in record.getMessage() and "triton-windows" in record.getMessage()


def test_built_wheel_ships_the_kernels(tmp_path):
    """`pip wheel .` (from a copy, so no build/ lands in the checkout) holds every kernel and reference
    under quantsparse_kernels/ and declares the per-platform Triton extras (~5 s)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("quantsparse_core", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp_path / "dist")],
                       capture_output=True, text=True, timeout=300)
    unreachable = ("No matching distribution found for setuptools", "Could not find a version that satisfies",
                   "Failed to establish a new connection", "Temporary failure in name resolution")
    if r.returncode and any(m in r.stderr for m in unreachable):
        pytest.skip("pip cannot fetch the build backend (setuptools>=77) here: no package index reachable")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("quantsparse-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    kernels = {f"quantsparse_kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert {"quantsparse_kernels/sparse_attention.py", "quantsparse_kernels/int_gemm.py"} <= kernels
    assert kernels <= names, sorted(kernels - names)
    assert not any(n.startswith("kernels/") for n in names)
    assert "quantsparse_core/dispatch.py" in names
    assert any(n.startswith("quantsparse_core/models/tiny/") and n.endswith(".safetensors") for n in names)
    assert 'triton-windows>=3.2; sys_platform == "win32" and extra == "kernels"' in metadata, metadata

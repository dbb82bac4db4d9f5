"""The core imports without ComfyUI; the package metadata is what Manager and pip need."""
import subprocess
import sys
import tomllib
from pathlib import Path

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

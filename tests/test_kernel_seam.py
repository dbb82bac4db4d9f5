"""kernels/ is a leaf behind one seam: the kernels import nothing of the library, the library reaches
them only through quantsparse_core.dispatch, and a foreign package called `kernels` hides nothing."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels, torch
from quantsparse_core import dispatch
from quantsparse_core.quant.linear import _kernels_on
import quantsparse_kernels.sparse_attention_ref as ref
print(kernels.FOREIGN, ref.__name__, ref.__file__.startswith({root!r}), _kernels_on(torch.device("cpu")))
"""


def _imports(path: Path):
    """Top-level module names a file imports (absolute imports only)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return names


def test_kernels_import_nothing_of_the_library():
    offenders = {p.name: n for p in (ROOT / "kernels").glob("*.py") for n in _imports(p)
                 if n in ("quantsparse_core", "kernels", "quantsparse_kernels")}
    assert offenders == {}


def test_only_the_dispatch_module_reaches_the_kernels():
    reach = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "quantsparse_core").rglob("*.py")
                   if "quantsparse_kernels" in p.read_text() or {"kernels", "quantsparse_kernels"} & set(_imports(p)))
    assert reach == ["quantsparse_core/dispatch.py"]


def test_foreign_kernels_package_does_not_hide_ours(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = 'theirs'\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", QUANTSPARSE_KERNELS="auto")
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["theirs", "quantsparse_kernels.sparse_attention_ref", "True", "False"]


def test_report_names_a_path_for_every_operation():
    from quantsparse_core import dispatch
    with dispatch.forced("torch"):
        rep = dispatch.report("cpu")
    assert set(dispatch.OPERATIONS) <= set(rep)
    assert all(rep[op].startswith("torch") for op in dispatch.OPERATIONS)
    out = subprocess.run([sys.executable, "-m", "quantsparse_core.dispatch"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, QUANTSPARSE_KERNELS="torch"))
    assert out.returncode == 0 and "sparse_attention: torch" in out.stdout, out.stdout + out.stderr

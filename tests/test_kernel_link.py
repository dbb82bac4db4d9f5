"""Our kernels package is found even when another installed package is also called `kernels`."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import kernels, torch
from quantsparse_core.kernel_link import kernel_module
from quantsparse_core.quant.linear import _kernels_on
d = kernel_module("dispatch")
print(kernels.FOREIGN, d.__name__, d.__file__.startswith({root!r}), _kernels_on(torch.device("cpu")))
"""


def test_foreign_kernels_package_does_not_hide_ours(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = 'theirs'\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", QUANTSPARSE_KERNELS="auto")
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["theirs", "quantsparse_kernels.dispatch", "True", "False"]


def test_in_the_repository_kernels_is_ours():
    from quantsparse_core.kernel_link import kernel_module
    import kernels.dispatch
    assert kernel_module("dispatch") is kernels.dispatch

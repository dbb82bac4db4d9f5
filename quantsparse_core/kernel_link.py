"""Import this repository's `kernels` package even when another installed package is also called
`kernels` (one exists on PyPI). Inside ComfyUI the pack folder is appended to sys.path, after
site-packages, so a plain `import kernels` could find the other one; then ours is loaded from its
file path under a private name. Returns None when ours is absent (e.g. quantsparse_core installed
on its own), and callers keep to their PyTorch references.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

_OURS = Path(__file__).resolve().parents[1] / "kernels"
_ALIAS = "quantsparse_kernels"


@functools.lru_cache(maxsize=None)  # called on hot paths (every quantized linear): resolve once
def _package() -> Optional[str]:
    """The importable name under which our kernels package lives, loading it if needed."""
    init = _OURS / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.find_spec("kernels") if "kernels" not in sys.modules else None
    found = sys.modules.get("kernels")
    origin = getattr(found, "__file__", None) if found is not None else (spec.origin if spec else None)
    if origin is not None and Path(origin).resolve() == init.resolve():
        return "kernels"
    if _ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(_ALIAS, init, submodule_search_locations=[str(_OURS)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_ALIAS] = module
        spec.loader.exec_module(module)
    return _ALIAS


def kernel_module(name: str) -> Optional[ModuleType]:
    """Our kernels.<name> (e.g. "dispatch", "sparse_attention"), or None if it cannot be imported
    (no Triton, or the kernels folder is not shipped)."""
    try:
        package = _package()
        return None if package is None else importlib.import_module(f"{package}.{name}")
    except ImportError:
        return None

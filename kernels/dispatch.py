"""Choose the Triton kernels or their PyTorch references, per call.

auto (default): Triton for CUDA tensors when Triton imports, the reference everywhere else.
Override with the environment variable QUANTSPARSE_KERNELS=auto|triton|torch, or `with forced(mode)`.
"triton" on CPU tensors needs TRITON_INTERPRET=1 set before the kernels are imported (tests do this).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

ENV = "QUANTSPARSE_KERNELS"
MODES = ("auto", "triton", "torch")
_forced: Optional[str] = None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails on import
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    m = _forced or os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r} is not one of {MODES}")
    return m


def use_triton(device: torch.device | str) -> bool:
    """Whether a kernel call on tensors living on `device` should take the Triton path."""
    device = torch.device(device)
    m = mode()
    if m == "torch":
        return False
    if m == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but Triton is not importable: `pip install triton`, "
                               f"or set {ENV}=auto to use the PyTorch references")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(f"{ENV}=triton on {device} tensors needs TRITON_INTERPRET=1 "
                               "(set before importing the kernels), or a CUDA device")
        return True
    return device.type == "cuda" and triton_available()


@contextlib.contextmanager
def forced(m: str) -> Iterator[None]:
    """Temporarily force a mode (tests, benchmarks): with forced("torch"): ..."""
    global _forced
    if m not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {m!r}")
    old, _forced = _forced, m
    try:
        yield
    finally:
        _forced = old

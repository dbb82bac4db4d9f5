"""Whether the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1).

The kernels need to know it (a few code paths differ there: no warp specialisation, IEEE dots);
which path runs for a call, Triton or the PyTorch reference, is decided by the library's one
dispatch module (quantsparse_core.dispatch), never here.
"""
from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

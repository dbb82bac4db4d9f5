"""Locating a ComfyUI checkout for the tests that need one (COMFYUI_PATH)."""
import os
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def require_comfyui():
    """Skip (with the reason) unless COMFYUI_PATH names a ComfyUI checkout; else make it importable."""
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (>= 0.14) to run this test")
    root = Path(COMFYUI_PATH)
    if not (root / "comfy" / "ldm" / "hunyuan_video" / "model.py").is_file():
        pytest.skip(f"COMFYUI_PATH={root} has no comfy/ldm/hunyuan_video/model.py: not a ComfyUI checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from comfy.cli_args import args
        if not _has_cuda():
            args.cpu = True  # ComfyUI probes CUDA at import unless told to use the CPU
        import comfy.model_management  # noqa: F401  (fails without ComfyUI's requirements)
    except ImportError as e:
        pytest.skip(f"ComfyUI at {root} cannot be imported in this Python ({e}); "
                    "run pytest with the interpreter ComfyUI uses")
    return root


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def comfyui_version(root) -> str:
    ns = {}
    exec((Path(root) / "comfyui_version.py").read_text(), ns)
    return ns.get("__version__", "unknown")


def record_sparse_calls(monkeypatch, sparse_patch, record) -> list:
    """Every attention call that reaches SSAR through `sparse_patch` (the pack's nodes/sparse_patch module),
    after it ran: `record(attn, q, mask, call)` (attn = the run's SSARAttention) returns the entry to keep."""
    seen = []
    original = sparse_patch.SparseRun.attention_for

    def attention_for(self, group):
        attn = original(self, group)

        def call(q, k, v, mask, c):
            out = attn(q, k, v, mask, c)
            seen.append(record(attn, q, mask, c))
            return out
        return call

    monkeypatch.setattr(sparse_patch.SparseRun, "attention_for", attention_for)
    return seen

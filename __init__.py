"""ComfyUI entry point of the QuantSparse node pack (V3 node API: `comfy_entrypoint`).

The pack folder goes on sys.path (at the end, so nothing of ComfyUI is shadowed) so that
`quantsparse_core` imports without a separate pip install. Outside ComfyUI (pytest imports this
file as a package) there are no nodes to register.
"""
import importlib.util
import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

"""nodes/instance_patches.py: what counts as another node changing a module's call (no ComfyUI needed: the module
is loaded from its file)."""
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "qs_instance_patches", Path(__file__).resolve().parents[1] / "nodes" / "instance_patches.py")
ip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ip)


def test_patched_restored_and_hooked_forwards():
    m = torch.nn.LayerNorm(8)
    assert not ip.forward_patched(m) and not ip.call_changed(m)
    saved = m.forward                                  # what comfy.utils.set_attr saves: the class's bound forward
    m.forward = lambda x: x * 2                        # an object patch / bypass LoRA's injection
    assert ip.forward_patched(m) and ip.call_changed(m)
    m.forward = saved                                  # ComfyUI's undo sets it back on the instance
    assert "forward" in vars(m) and not ip.forward_patched(m)
    other = torch.nn.LayerNorm(8)
    m.forward = other.forward                          # another instance's forward is a patch
    assert ip.forward_patched(m)
    del m.forward
    handle = m.register_forward_pre_hook(lambda mod, args: None)
    assert not ip.forward_patched(m) and ip.call_changed(m)
    handle.remove()
    assert not ip.call_changed(m)

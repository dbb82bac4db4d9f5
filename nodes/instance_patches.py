"""Whether another node changed what calling a module does, on that module instance: ComfyUI's object patches
and bypass LoRAs set `forward` on the instance, forward hooks run around it. Code that computes a module's
math without calling it (the fused blocks, the producers' quantized inputs) must step aside then.

ComfyUI undoes a forward patch by setting the saved attribute back (comfy/utils.set_attr, the model patcher's
unpatch, bypass LoRA's eject): the instance then holds its class's own forward, bound to itself, which is no patch."""
from __future__ import annotations

import torch


def forward_patched(module: torch.nn.Module) -> bool:
    """A forward set on the instance that is not its class's own forward bound to it."""
    f = vars(module).get("forward")
    if f is None:
        return False
    return not (getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is type(module).forward)


def call_changed(module: torch.nn.Module) -> bool:
    """forward_patched, or forward (pre-)hooks registered on the instance."""
    return forward_patched(module) or bool(module._forward_hooks) or bool(module._forward_pre_hooks)

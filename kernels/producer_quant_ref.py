"""PyTorch reference for kernels.producer_quant: the producing op in fp32, its output rounded once to
the model dtype (as the unfused model holds it), then kernels.act_quant_ref's quantization."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .act_quant_ref import act_quant_ref


def norm_modulate_quant_ref(x, shift, scale, inv_smooth, clip, bits: int, residual=None, gate=None):
    xo = None
    if residual is not None:
        x = xo = (x.float() + residual.float() * gate.float()).to(x.dtype)
    h = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6) * (1 + scale.float()) + shift.float()
    codes, s = act_quant_ref(h.to(x.dtype), bits, inv_smooth, clip)
    return xo, codes, s


def gelu_quant_ref(hid, inv_smooth, clip, bits: int, prefix=None):
    g = F.gelu(hid.float(), approximate="tanh").to(hid.dtype)
    return act_quant_ref(g if prefix is None else torch.cat((prefix, g), dim=-1), bits, inv_smooth, clip)

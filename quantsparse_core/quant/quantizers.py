"""Uniform symmetric integer quantizers (weights per output channel, activations per token).

q = clamp(round(x / s), -qmax, qmax), s = clip * max|x| / qmax, qmax = 2^(bits-1) - 1.
The learnable clipping factor is trained through a straight-through estimator on the rounding.
"""
from __future__ import annotations

import torch

SUPPORTED_WEIGHT_BITS = (4, 6, 8)
SUPPORTED_ACT_BITS = (6, 8, 16)  # 16 = keep activations in floating point (weight-only)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def check_bits(w_bits: int, a_bits: int) -> None:
    if w_bits not in SUPPORTED_WEIGHT_BITS:
        raise ValueError(f"weight bits {w_bits} unsupported; choose one of {SUPPORTED_WEIGHT_BITS}")
    if a_bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"activation bits {a_bits} unsupported; choose one of {SUPPORTED_ACT_BITS} "
                         "(16 means weight-only)")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def absmax_scale(x: torch.Tensor, bits: int, dim: int = -1, clip: torch.Tensor | float = 1.0,
                 eps: float = 1e-8) -> torch.Tensor:
    """Per-row scale along `dim` reduced away (keepdim) so that clip * max|x| maps to qmax."""
    return (x.abs().amax(dim=dim, keepdim=True) * clip).clamp_min(eps) / qmax(bits)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize with STE rounding (differentiable in x and scale)."""
    m = qmax(bits)
    return torch.clamp(round_ste(x / scale), -m, m) * scale


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 storage) for x at `scale`."""
    m = qmax(bits)
    return torch.clamp(torch.round(x / scale), -m, m).to(torch.int8)


def quantize_per_token(x: torch.Tensor, bits: int):
    """Dynamic per-token activation quantization: (int8 codes, fp32 scale [..., 1])."""
    scale = absmax_scale(x.float(), bits, dim=-1)
    return quantize(x.float(), scale, bits), scale


# -- lean fake quantization for calibration under autocast ---------------------------------------------
# fake_quant() above, written with plain ops, keeps (through autograd) about five float32 copies of
# its input per call: x.float(), x * exp(-s), |x|, the clamp input and output. At 13B widths and
# 30k tokens that is ~8 GB for one MLP down-projection alone (docs/CALIBRATION.md, "First H200
# runs"). The two Functions below compute the same forward values (bit for bit: the same float32
# ops row by row; rows are independent) but save only their input (in its own dtype) and recompute
# the rest in backward, over row chunks so no full-size float32 temporary exists. Their gradients
# are the straight-through-estimator gradients of fake_quant(), accumulated in another order (equal
# to float32 rounding). QuantLinear uses them under autocast only; without autocast it keeps the
# plain ops (that path is the one the byte-identical streaming / whole-model tests pin).

ROW_CHUNK = 4096  # rows per chunk (activations: tokens; weights: output channels)
_EPS = 1e-8


def _rows(n: int, chunk: int):
    chunk = max(1, chunk)
    return ((i, min(n, i + chunk)) for i in range(0, n, chunk))


def _fq_rows(u, clip, m):
    """(scale, pre-clamp rounded codes) of float32 rows u along the last dim, as fake_quant(absmax_scale)."""
    a = u.abs().amax(dim=-1, keepdim=True)
    sc = (a * clip).clamp_min(_EPS) / m
    return a, sc, torch.round(u / sc)


def _fq_rows_backward(g, u, a, sc, r, clip, m):
    """d/du and d/dclip (unreduced, per row) of clamp(round_ste(u / sc), -m, m) * sc with
    sc = max(clip * amax|u|, eps) / m, given the output gradient g (float32)."""
    c = torch.clamp(r, -m, m)
    inside = (r >= -m) & (r <= m)
    dsc = (g * c).sum(-1, keepdim=True)                       # y = c * sc
    dr = torch.where(inside, g * sc, 0.0)                     # clamp, STE round
    du = dr / sc                                              # r = u / sc
    dsc = dsc + (-dr * u / (sc * sc)).sum(-1, keepdim=True)
    dac = torch.where(a * clip >= _EPS, dsc / m, 0.0)         # sc = max(a * clip, eps) / m
    dclip = dac * a
    da = dac * clip
    tie = u.abs() == a                                        # amax: split among ties, abs: sign
    du = du + torch.where(tie, (da / tie.sum(-1, keepdim=True)) * u.sgn(), 0.0)
    return du, dclip


class _ActFakeQuant(torch.autograd.Function):
    """y = fake_quant(u, absmax_scale(u, bits, -1, clip), bits), u = x.float() * exp(-log_smooth)
    (log_smooth None: u = x.float()), returned in out_dtype. Saves x, log_smooth, clip."""

    @staticmethod
    def forward(ctx, x, log_smooth, clip, bits, out_dtype, chunk):
        m = qmax(bits)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        e = None if log_smooth is None else torch.exp(-log_smooth)
        out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        for i, j in _rows(x2.shape[0], chunk):
            u = x2[i:j].float()
            if e is not None:
                u = u * e
            _, sc, r = _fq_rows(u, clip, m)
            out[i:j] = torch.clamp(r, -m, m) * sc
        ctx.save_for_backward(x, log_smooth, clip)
        ctx.bits, ctx.chunk = bits, chunk
        return out.reshape(*x.shape[:-1], k)

    @staticmethod
    def backward(ctx, grad):
        x, log_smooth, clip = ctx.saved_tensors
        m, k = qmax(ctx.bits), x.shape[-1]
        x2, g2 = x.reshape(-1, k), grad.reshape(-1, k)
        e = None if log_smooth is None else torch.exp(-log_smooth)
        dx = torch.empty_like(x2) if ctx.needs_input_grad[0] else None
        de = torch.zeros(k, dtype=torch.float32, device=x.device) if e is not None and ctx.needs_input_grad[1] else None
        dclip = torch.zeros((), dtype=torch.float32, device=x.device)
        for i, j in _rows(x2.shape[0], ctx.chunk):
            xf = x2[i:j].float()
            u = xf if e is None else xf * e
            a, sc, r = _fq_rows(u, clip, m)
            du, dc = _fq_rows_backward(g2[i:j].float(), u, a, sc, r, clip, m)
            dclip += dc.sum()
            if de is not None:
                de += (du * xf).sum(0)
            if dx is not None:
                dx[i:j] = du if e is None else du * e
        dls = None if de is None else -(de * e)
        return (None if dx is None else dx.reshape(x.shape)), dls, dclip.reshape(clip.shape), None, None, None


class _WeightFakeQuant(torch.autograd.Function):
    """y = fake_quant(w, absmax_scale(w, bits, 1, clip), bits), w = weight.float() * exp(log_smooth)
    (log_smooth None: w = weight.float()), one scale per row (output channel), clip [N, 1];
    returned in out_dtype. Saves weight (a parameter: no new memory), log_smooth, clip."""

    @staticmethod
    def forward(ctx, weight, log_smooth, clip, bits, out_dtype, chunk):
        m = qmax(bits)
        e = None if log_smooth is None else torch.exp(log_smooth)
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
        for i, j in _rows(weight.shape[0], chunk):
            w = weight[i:j].float()
            if e is not None:
                w = w * e
            _, sc, r = _fq_rows(w, clip[i:j], m)
            out[i:j] = torch.clamp(r, -m, m) * sc
        ctx.save_for_backward(weight, log_smooth, clip)
        ctx.bits, ctx.chunk = bits, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, log_smooth, clip = ctx.saved_tensors
        m = qmax(ctx.bits)
        e = None if log_smooth is None else torch.exp(log_smooth)
        dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if ctx.needs_input_grad[0] else None
        de = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device) \
            if e is not None and ctx.needs_input_grad[1] else None
        dclip = torch.empty(clip.shape, dtype=torch.float32, device=clip.device)
        for i, j in _rows(weight.shape[0], ctx.chunk):
            wf = weight[i:j].float()
            u = wf if e is None else wf * e
            a, sc, r = _fq_rows(u, clip[i:j], m)
            du, dclip[i:j] = _fq_rows_backward(grad[i:j].float(), u, a, sc, r, clip[i:j], m)
            if de is not None:
                de += (du * wf).sum(0)
            if dw is not None:
                dw[i:j] = du if e is None else du * e
        return dw, (None if de is None else de * e), dclip, None, None, None


def fake_quant_act(x: torch.Tensor, bits: int, clip: torch.Tensor, log_smooth: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Per-token fake quantization of x (smoothed by exp(-log_smooth) first when given) with the
    scalar clipping factor `clip`: the values of fake_quant(u, absmax_scale(u, bits, -1, clip)),
    u = x.float() * exp(-log_smooth), in out_dtype, saving only x for backward."""
    return _ActFakeQuant.apply(x, log_smooth, clip, bits, out_dtype, chunk)


def fake_quant_weight(weight: torch.Tensor, bits: int, clip: torch.Tensor, log_smooth: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float32, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Per-output-channel fake quantization of weight.float() * exp(log_smooth) (clip [N, 1]): the
    values of fake_quant(w, absmax_scale(w, bits, 1, clip)) in out_dtype, saving only references."""
    return _WeightFakeQuant.apply(weight, log_smooth, clip, bits, out_dtype, chunk)

"""QuantLinear: a linear layer with W-bit per-output-channel weights and A-bit dynamic per-token
activations, with optional smoothing and Kronecker rotation on its input.

mode "fake" (calibration): float weights, quantize-dequantize with straight-through rounding, so
clipping, smoothing and rotation can be learned. freeze() switches to mode "real": the transformed
weight is folded, quantized and packed; the activation transform runs online.

Real mode where quantsparse_core.dispatch picks Triton runs the fused path: kernels.act_quant
(smoothing + clip + per-token quantization in one pass) then kernels.int_gemm (int8 x int8/int4,
scales and bias in the epilogue). The kernel weight layout is made once, on the first such forward
(or by prepare_kernels()), kept as a plain attribute: never saved, dropped when the module moves.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from ..dispatch import pack_int4, unpack_int4
from .quantizers import absmax_scale, check_bits, fake_quant, fake_quant_act, fake_quant_weight, quantize
from .transforms import OrthogonalFactor, apply_kron, hadamard, kron_factors

CLIP_MIN = 0.2  # never clip more than 80% of a row's range


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Fake mode under autocast (calibration on the GPU): the lean fake-quant Functions (LEAN_AMP) and the
# output left in the autocast dtype (AMP_OUTPUT_AUTOCAST_DTYPE). Switches for measurements
# (benchmarks/calibration_memory.py); without autocast neither applies.
LEAN_AMP = True
AMP_OUTPUT_AUTOCAST_DTYPE = True


class QuantizedInput(NamedTuple):
    """A QuantLinear input already quantized by its producer (e.g. a compiled norm + modulation group
    that emits int8 codes instead of bf16, so no separate quantization pass reads it again).
    codes int8 [M, K], scale fp32 [M, 1], lead: the input's leading dims, dtype: the output dtype."""
    codes: torch.Tensor
    scale: torch.Tensor
    lead: tuple
    dtype: torch.dtype


# The rank multiple kernels.int_gemm takes a side path at (its LORA_RANK_MULTIPLE): side paths padded to it
# once (quant.low_rank.LowRank) run in the GEMM's epilogue as they are; others are padded per call.
SIDE_RANK_MULTIPLE = 16


def _projected(side, x, layer):
    """A side path as (h, up): a LowRank (quant.low_rank) projects x itself."""
    return side.project(x, layer) if side is not None and not isinstance(side, tuple) else side


def _side_term(side, lead: tuple) -> torch.Tensor:
    """h @ up^T of a low-rank side path (h [..., R], up [N, R]) in fp32, shaped [*lead, N]."""
    h, up = side
    return (h.float().reshape(*lead, h.shape[-1]) @ up.float().t())


def _side_rows(side, start: int, end: int):
    return None if side is None else (side[0], side[1][start:end])


def _kernel_side(side, m: int, dtype):
    """The side path as kernels.int_gemm takes it: h [M, R], up [N, R], both in the output dtype."""
    if side is None:
        return None
    h, up = side
    h, up = h.reshape(m, h.shape[-1]).to(dtype), up.to(dtype)
    pad = -h.shape[1] % SIDE_RANK_MULTIPLE
    if pad:
        h, up = F.pad(h, (0, pad)), F.pad(up, (0, pad))
    return h, up


def _kernels_on(device: torch.device) -> bool:
    """Whether the fused Triton kernels run for tensors on `device` (quantsparse_core.dispatch)."""
    return dispatch.quantized_linear_kernels(device) is not None


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, w_bits: int = 4, a_bits: int = 8, smooth: bool = False,
                 rotation: str | None = None):
        super().__init__()
        check_bits(w_bits, a_bits)
        if rotation not in (None, "hadamard", "learned"):
            raise ValueError(f"rotation must be None, 'hadamard' or 'learned', got {rotation!r}")
        self.w_bits, self.a_bits, self.rotation = w_bits, a_bits, rotation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dev = linear.weight.device
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone(),
                                                                 requires_grad=False)
        self.w_clip = nn.Parameter(torch.ones(self.out_features, 1, device=dev))
        self.a_clip = nn.Parameter(torch.ones((), device=dev))
        self.log_smooth = nn.Parameter(torch.zeros(self.in_features, device=dev)) if smooth else None
        self.r1 = self.r2 = None
        if rotation:
            n1, n2 = kron_factors(self.in_features)
            h1, h2 = hadamard(n1).to(dev), hadamard(n2).to(dev)
            if rotation == "learned":
                self.r1, self.r2 = OrthogonalFactor(h1), OrthogonalFactor(h2)
            else:
                self.register_buffer("h1", h1.float())
                self.register_buffer("h2", h2.float())
        self.mode = "fake"

    # -- the input transform, shared by both modes ------------------------------------------------
    def _factors(self):
        """The rotation's two factors: trained ones while learnable, else fixed buffers (Hadamard, or
        the evaluated factors of a loaded layer)."""
        if self.r1 is not None:
            return self.r1(), self.r2()
        if self.rotation:
            return self.h1, self.h2
        return None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_smooth is not None:
            x = x * torch.exp(-self.log_smooth)
        f = self._factors()
        return x if f is None else apply_kron(x, *f)

    def transformed_weight(self) -> torch.Tensor:
        """W diag(s) R: the weight with the smoothing and rotation folded in."""
        w = self.weight
        if self.log_smooth is not None:
            w = w * torch.exp(self.log_smooth)
        f = self._factors()
        return w if f is None else apply_kron(w, *f)

    def _act_scale(self, x):
        return absmax_scale(x, self.a_bits, dim=-1, clip=self.a_clip.clamp(CLIP_MIN, 1.0))

    # -- modes ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, side: tuple | None = None) -> torch.Tensor:
        """side: a low-rank side path (h = x down^T [..., R], up [out_features, R]) whose h @ up^T is
        added to the output before it is rounded to x's dtype (a LoRA beside the packed weight; on the
        kernel path inside the GEMM's epilogue, R a multiple of kernels.int_gemm.LORA_RANK_MULTIPLE); or a
        quant.low_rank.LowRank, which makes h from x (float, or a producer's codes) itself."""
        side = _projected(side, x, self)
        if isinstance(x, QuantizedInput):
            return self._forward_quantized(x, side)
        if self.mode == "real" and self.a_bits < 16 and x.dtype in _KERNEL_DTYPES and _kernels_on(x.device):
            return self._triton_forward(x, side)  # fused: no fp32 copy of x is made
        if self.mode == "fake" and LEAN_AMP and torch.is_autocast_enabled(x.device.type):
            y = self._fake_amp(x)
            return y if side is None else y + _side_term(side, tuple(x.shape[:-1])).to(y.dtype)
        y = self._forward_fp32(x)
        if side is not None:
            y = y + _side_term(side, tuple(x.shape[:-1]))
        return y.to(x.dtype)

    def _forward_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """forward() off the kernel path and outside autocast, in fp32 (before the cast to x's dtype)."""
        xt = self.transform_input(x.float())
        if self.mode == "fake":
            w = self.transformed_weight()
            w = fake_quant(w, absmax_scale(w, self.w_bits, dim=1, clip=self.w_clip.clamp(CLIP_MIN, 1.0)), self.w_bits)
            if self.a_bits < 16:
                xt = fake_quant(xt, self._act_scale(xt), self.a_bits)
            return F.linear(xt, w, self.bias)
        if self.a_bits < 16:
            sx = self._act_scale(xt)
            return self._int_gemm_torch(quantize(xt, sx, self.a_bits), sx)
        codes = unpack_int4(self.w_packed) if self.w_bits == 4 else self.w_packed
        y = xt @ (codes.float() * self.w_scale).t()
        if self.bias is not None:
            y = y + self.bias
        return y

    def _fake_amp(self, x: torch.Tensor) -> torch.Tensor:
        """Fake mode under autocast (calibration on the GPU): the values of the plain path (the linear
        runs in the autocast dtype either way) with quantizers.fake_quant_act / fake_quant_weight,
        which keep only their inputs for backward instead of ~5 float32 copies. The output stays in
        the autocast dtype, as nn.Linear's does under autocast, instead of being cast back to x's
        dtype (a float32 copy of e.g. [30k x 12288] that the next op would keep): the one
        difference from the plain path, measured in tests/test_calibration_memory.py."""
        ldt = torch.get_autocast_dtype(x.device.type)
        clip_w = self.w_clip.clamp(CLIP_MIN, 1.0)
        rotated = self.rotation is not None
        if rotated:   # rotation: the plain transforms, then the lean quantizer on their result
            w = fake_quant_weight(self.transformed_weight(), self.w_bits, clip_w, None, ldt)
        else:
            w = fake_quant_weight(self.weight, self.w_bits, clip_w, self.log_smooth, ldt)
        if self.a_bits < 16:
            clip_a = self.a_clip.clamp(CLIP_MIN, 1.0)
            if rotated:
                xq = fake_quant_act(self.transform_input(x.float()), self.a_bits, clip_a, None, ldt)
            else:
                xq = fake_quant_act(x, self.a_bits, clip_a, self.log_smooth, ldt)
        else:
            xq = self.transform_input(x.float())
        y = F.linear(xq, w, self.bias)
        return y if AMP_OUTPUT_AUTOCAST_DTYPE else y.to(x.dtype)

    def _int_gemm_torch(self, xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """Integer GEMM of activation codes with the weight codes, scales (and bias) in the epilogue, fp32."""
        codes = unpack_int4(self.w_packed) if self.w_bits == 4 else self.w_packed
        y = (xq.float() @ codes.float().t()) * sx * self.w_scale.t()
        return y if self.bias is None else y + self.bias

    # -- inputs quantized by their producer ------------------------------------------------------------
    def input_quant_spec(self, x: torch.Tensor) -> tuple | None:
        """(inv_smooth or None, clip (float), a_bits) when a producer may hand this layer
        a QuantizedInput for x instead of x: a frozen layer with quantized activations, no rotation (the
        rotation stays in kernels.act_quant), on the kernel path. None otherwise: pass x as it is."""
        if self.mode != "real" or self.a_bits >= 16 or self.rotation or x.dtype not in _KERNEL_DTYPES \
                or not _kernels_on(x.device):
            return None
        st = self.prepare_kernels()
        return st["inv_smooth"], st["clip"], self.a_bits

    def _forward_quantized(self, q: QuantizedInput, side: tuple | None = None) -> torch.Tensor:
        if self.mode != "real" or self.a_bits >= 16 or self.rotation:
            raise ValueError(f"a QuantizedInput needs a frozen layer with quantized activations and no rotation; "
                             f"this one is {self.extra_repr()}: pass the float input instead")
        if q.codes.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedInput has K={q.codes.shape[-1]}, this layer takes {self.in_features}")
        if q.dtype in _KERNEL_DTYPES and _kernels_on(q.codes.device):
            st = self.prepare_kernels()
            _, gemm = dispatch.quantized_linear_kernels(q.codes.device)
            y = gemm.int_gemm(q.codes, q.scale, st["weight"], st["bias"], out_dtype=q.dtype,
                              lora=_kernel_side(side, q.codes.shape[0], q.dtype))
        else:
            y = self._int_gemm_torch(q.codes, q.scale)
            if side is not None:
                y = y + _side_term(side, (q.codes.shape[0],))
            y = y.to(q.dtype)
        return y.reshape(*q.lead, self.out_features)

    def forward_rows(self, x, start: int, end: int, side: tuple | None = None) -> torch.Tensor:
        """Output features [start, end) only, exactly as forward(x)[..., start:end]: a frozen layer's
        weight rows are independent (per-channel scales, per-token activation quantization of the input),
        so a block can compute one part of a fused projection now and another later, per token chunk,
        instead of holding the whole output (the single block's linear1: qkv before attention, the MLP
        half after it). side: as in forward(), its up weights for all out_features."""
        side = _projected(side, x, self)
        if self.mode != "real":
            raise ValueError("forward_rows() needs a frozen layer: call freeze() first")
        if not 0 <= start < end <= self.out_features:
            raise ValueError(f"rows [{start}, {end}) are not inside [0, {self.out_features})")
        quantized = isinstance(x, QuantizedInput)
        device, dtype = (x.codes.device, x.dtype) if quantized else (x.device, x.dtype)
        if self.a_bits < 16 and dtype in _KERNEL_DTYPES and _kernels_on(device) and not (quantized and self.rotation):
            st = self.prepare_kernels()
            act, gemm = dispatch.quantized_linear_kernels(device)
            if quantized:
                codes, sx, lead = x.codes, x.scale, x.lead
            else:
                f = self._factors()
                r1, r2 = (None, None) if f is None else f
                codes, sx = act.act_quant(x, self.a_bits, st["inv_smooth"], st["clip"], r1, r2)
                lead = tuple(x.shape[:-1])
            w = st["weight"]
            part = type(w)(w.data[start:end], w.w_bits, w.in_features, w.scale[start:end])
            bias = None if st["bias"] is None else st["bias"][start:end]
            return gemm.int_gemm(codes, sx, part, bias, out_dtype=dtype,
                                 lora=_kernel_side(_side_rows(side, start, end), codes.shape[0], dtype)
                                 ).reshape(*lead, end - start)
        if quantized:
            return self._forward_quantized(x, side)[..., start:end]  # reference path: the whole output
        if self.a_bits >= 16:
            return self.forward(x, side)[..., start:end]
        xt = self.transform_input(x.float())
        sx = self._act_scale(xt)
        codes = (unpack_int4(self.w_packed) if self.w_bits == 4 else self.w_packed)[start:end]
        y = (quantize(xt, sx, self.a_bits).float() @ codes.float().t()) * sx * self.w_scale[start:end].t()
        if self.bias is not None:
            y = y + self.bias[start:end]
        if side is not None:
            y = y + _side_term(_side_rows(side, start, end), tuple(x.shape[:-1]))
        return y.to(dtype)

    # -- the Triton path (real mode, quantized activations) -----------------------------------------
    def _apply(self, fn, *args, **kwargs):
        self._kernel_state = None  # the prepared layout belongs to the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def prepare_kernels(self) -> dict:
        """Lay the weight out for kernels.int_gemm (once) and cache the per-call constants."""
        if self.mode != "real":
            raise ValueError("prepare_kernels() needs a frozen layer: call freeze() first")
        # Inference tensors (ComfyUI loads and runs under torch.inference_mode) have no version
        # counter; the packed weight is never modified in place, so its storage identifies it.
        version = -1 if self.w_packed.is_inference() else self.w_packed._version
        key = (self.w_packed.device, self.w_packed.data_ptr(), version)
        st = getattr(self, "_kernel_state", None)
        if st is None or st["key"] != key:
            kernels = dispatch.quantized_linear_kernels(self.w_packed.device)
            if kernels is None:
                raise RuntimeError(f"prepare_kernels(): the Triton path is off for {self.w_packed.device} tensors "
                                   "(python -m quantsparse_core.dispatch says why)")
            gemm = kernels[1]
            st = {"key": key, "weight": gemm.prepare_weight(self.w_packed, self.w_bits, self.w_scale),
                  "clip": float(self.a_clip.clamp(CLIP_MIN, 1.0)),
                  "inv_smooth": None if self.log_smooth is None else torch.exp(-self.log_smooth).float(),
                  "bias": None if self.bias is None else self.bias.float().contiguous()}
            self._kernel_state = st
        return st

    def _triton_forward(self, x: torch.Tensor, side: tuple | None = None) -> torch.Tensor:
        act, gemm = dispatch.quantized_linear_kernels(x.device)
        act_quant = act.act_quant
        st = self.prepare_kernels()
        f = self._factors()
        r1, r2 = (None, None) if f is None else f
        codes, sx = act_quant(x, self.a_bits, st["inv_smooth"], st["clip"], r1, r2)
        y = gemm.int_gemm(codes, sx, st["weight"], st["bias"], out_dtype=x.dtype,  # x.dtype is a kernel dtype
                          lora=_kernel_side(side, codes.shape[0], x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def freeze(self) -> "QuantLinear":
        """Fold transforms into the weight, quantize and pack it, drop the float weight."""
        w = self.transformed_weight()
        scale = absmax_scale(w, self.w_bits, dim=1, clip=self.w_clip.clamp(CLIP_MIN, 1.0))
        codes = quantize(w, scale, self.w_bits)
        self.register_buffer("w_packed", pack_int4(codes) if self.w_bits == 4 else codes)
        self.register_buffer("w_scale", scale.float())
        self.weight = None
        for p in self.parameters():
            p.requires_grad_(False)
        self.mode = "real"
        return self

    def packed_tensors(self) -> dict:
        """What a frozen layer stores: {leaf: tensor} in storage dtypes (see docs/FORMAT.md)."""
        if self.mode != "real":
            raise ValueError("packed_tensors() needs a frozen layer: call freeze() first")
        t = {"weight_packed": self.w_packed, "weight_scale": self.w_scale.float()}
        if self.bias is not None:
            t["bias"] = self.bias.to(torch.bfloat16)
        if self.a_bits < 16:
            t["act_clip"] = self.a_clip.clamp(CLIP_MIN, 1.0).float()  # the clip real mode uses
        if self.log_smooth is not None:
            t["smooth"] = self.log_smooth.float()
        if self.rotation:
            t["rot1"], t["rot2"] = (f.float() for f in self._factors())
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    @classmethod
    def from_packed(cls, in_features: int, out_features: int, w_bits: int, a_bits: int, smooth: bool,
                    rotation: str | None, tensors: dict, device="cpu") -> "QuantLinear":
        """A frozen layer rebuilt from packed_tensors() output; no float weight is ever allocated."""
        check_bits(w_bits, a_bits)
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.w_bits, q.a_bits, q.rotation = w_bits, a_bits, rotation
        q.in_features, q.out_features = in_features, out_features
        get = lambda leaf: tensors[leaf].to(device)  # noqa: E731
        q.weight, q.w_clip, q.r1, q.r2 = None, None, None, None
        q.register_buffer("w_packed", get("weight_packed"))
        q.register_buffer("w_scale", get("weight_scale"))
        q.bias = nn.Parameter(get("bias").float(), requires_grad=False) if "bias" in tensors else None
        q.a_clip = nn.Parameter(get("act_clip") if a_bits < 16 else torch.ones((), device=device),
                                requires_grad=False)
        q.log_smooth = nn.Parameter(get("smooth"), requires_grad=False) if smooth else None
        if rotation:
            q.register_buffer("h1", get("rot1"))
            q.register_buffer("h2", get("rot2"))
        q.mode = "real"
        return q

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, W{self.w_bits}A{self.a_bits}, mode={self.mode}, "
                f"smooth={self.log_smooth is not None}, rotation={self.rotation}")

"""Activation quantization fused into the op that produces the activation (Triton).

In a W4A8 block most quantized linears read the output of a small elementwise/row op: the modulated
LayerNorm (qkv, linear1, and after the gated residual, MLP fc1), GELU (MLP fc2) and [attention
output | GELU] (single-block linear2). Writing that output in bf16 and then quantizing it in
kernels.act_quant reads it back from memory; these kernels compute the op and quantize its output per
token in the same pass (smoothing and clip as act_quant), writing only int8 codes + fp32 scales (and,
for the gated residual, the updated residual stream). The op's output is rounded to the model dtype
before quantization, as the unfused model holds it; references in producer_quant_ref.

- norm_modulate_quant: [x (+ y * gate)] -> LayerNorm (no affine, eps 1e-6) -> shift + h (1 + scale);
  one pass with ROWS rows in registers (K <= MAX_ONEPASS_K).
- gelu_quant: [prefix | GELU-tanh(hid)] (prefix optional): absmax pass, then codes pass re-reading the
  rows from L2, CHUNK columns at a time (any K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .act_quant import _codes, _scale_inv, merged_config
from .interpreter import interpreting

MAX_ONEPASS_K = 8192  # Wan2.1-14B's 5120 fits (a block of 8192 columns); HunyuanVideo's 3072 takes 4096
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _round_to_model_dtype(h, ROUND: tl.constexpr):
    """fp32 -> the model dtype -> fp32, round to nearest even. ROUND: 0 fp32 (none), 1 bf16 by bit
    arithmetic (the CPU interpreter's float -> bf16 cast truncates), 2 fp16, 3 bf16 by the hardware
    cast (one cvt.rn instruction on the GPU instead of five integer ops)."""
    if ROUND == 1:
        u = h.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        h = u.to(tl.float32, bitcast=True)
    elif ROUND == 2:
        h = h.to(tl.float16).to(tl.float32)
    elif ROUND == 3:
        h = h.to(tl.bfloat16).to(tl.float32)
    return h


def _round_code(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return 1 if interpreting() else 3
    return {torch.float32: 0, torch.float16: 2}[dtype]


def _math_code(device: torch.device) -> int:
    """_gelu_tanh's MATH: PTX tanh.approx on NVIDIA GPUs (sm_75 and newer have it), tl.math in the
    interpreter, on ROCm and on older GPUs."""
    if device.type != "cuda" or torch.version.hip is not None or interpreting():
        return 0
    return 1 if torch.cuda.get_device_capability(device) >= (7, 5) else 0


@triton.jit
def _norm_modulate_quant_kernel(x_ptr, y_ptr, g_ptr, xo_ptr, sh_ptr, sc_ptr, s_ptr, q_ptr, scale_ptr, clip,
                                M, K, L, stride_x, stride_y, stride_xo, stride_mod, eps,
                                QMAX: tl.constexpr, RESIDUAL: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                                ROWS: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    rows = rows.to(tl.int64)
    b = rows // L                                   # batch of each row: its modulation vectors
    cols = tl.arange(0, BLOCK)
    c_ok = cols < K
    m = r_ok[:, None] & c_ok[None, :]
    dt = xo_ptr.dtype.element_ty
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0).to(tl.float32)
    mod = b[:, None] * stride_mod + cols[None, :]
    if RESIDUAL:
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gate = tl.load(g_ptr + mod, mask=m, other=0.0).to(tl.float32)
        x = _round_to_model_dtype(x + y * gate, ROUND)   # the residual stream, in the model dtype
        tl.store(xo_ptr + rows[:, None] * stride_xo + cols[None, :], x.to(dt), mask=m)
    mean = tl.sum(x, axis=1) / K
    d = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / K + eps)
    shift = tl.load(sh_ptr + mod, mask=m, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(sc_ptr + mod, mask=m, other=0.0).to(tl.float32)
    h = _round_to_model_dtype(shift + d * rstd[:, None] * scale1, ROUND)  # the activation as the model holds it
    if HAS_SMOOTH:
        h = h * tl.load(s_ptr + cols, mask=c_ok, other=0.0)[None, :]
    # masked entries are 0 already: d is selected to 0 there and shift loads 0
    scale, inv = _scale_inv(tl.max(tl.abs(h), axis=1), clip, QMAX)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], _codes(h, scale[:, None], inv[:, None], QMAX, True), mask=m)
    tl.store(scale_ptr + rows, scale, mask=r_ok)


@triton.jit
def _tanh_approx(x):
    """PTX tanh.approx.f32: one special-function instruction (max relative error 2^-10.99)."""
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _gelu_tanh(x, MATH: tl.constexpr):
    """GELU, tanh approximation: 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3).

    The GELU producers are ALU-bound (GELU is evaluated twice per element: absmax pass, codes pass),
    so it is written for instruction count. MATH 1 (NVIDIA GPUs): tanh as one tanh.approx instruction;
    its 2^-11 relative error moved 3-4e-5 of the int8 codes by one step against the float reference
    (H200 sweep at fc2 / linear2 size, the scales unchanged) and made fc2's producer 15% faster than
    MATH 0: x / (1 + e^(-2u)) = x * rsqrt(1 + 2^t)^2, t = x (C1 + C2 x^2) (tl.math's exp2 / rsqrt,
    ~2^-22 each; the CPU interpreter and ROCm). The PTX ex2/rsqrt .ftz forms measured no faster than
    tl.math's. Both saturate correctly (x * 0 = -0, x * 1 = x; tanh.approx(+-inf) = +-1).
    Limit of MATH 1: near tanh = -1 the error is absolute (~2^-11), so GELU(x) for x in [-6, -2] is off
    by up to ~2.4e-4 |x| (its true value is -0.045 ... -6e-9). Against a row's int8 step that is
    nothing unless the row's largest |GELU| is itself small: a row whose inputs are all <= -2 (largest
    |GELU| 0.045) can have codes 1-2 steps off. config MATH=0 gives the accurate form."""
    if MATH == 1:
        hx = 0.5 * x
        g = tl.fma(hx, _tanh_approx(x * (0.7978845608028654 + 0.035677408136300125 * (x * x))), hx)
    else:
        r = tl.math.rsqrt(1.0 + tl.math.exp2(x * (-2.302208198144325 + -0.1029432395800235 * (x * x))))
        g = x * (r * r)
    return g


@triton.jit
def _segment(ptr, stride, rows, r_ok, k, offs, KSEG, s_ptr, s_off, GELU: tl.constexpr, HAS_SMOOTH: tl.constexpr,
             ROUND: tl.constexpr, MATH: tl.constexpr):
    """Columns [k, k + CHUNK) of one input segment: loaded, GELU'd if asked, rounded to the model
    dtype, smoothed. Returns the fp32 tile (zero where masked: the loads and the smoothing read 0 there
    and GELU(0) = 0, so no select is needed) and its mask."""
    c_ok = offs < KSEG - k
    m = r_ok[:, None] & c_ok[None, :]
    v = tl.load(ptr + rows[:, None] * stride + (k + offs)[None, :], mask=m, other=0.0)
    h = v.to(tl.float32)
    if GELU:
        h = _round_to_model_dtype(_gelu_tanh(h, MATH), ROUND)
    if HAS_SMOOTH:
        h = h * tl.load(s_ptr + s_off + k + offs, mask=c_ok, other=0.0)[None, :]
    return h, m


@triton.jit
def _gelu_quant_kernel(a_ptr, b_ptr, s_ptr, q_ptr, scale_ptr, clip, M, KA, KB, stride_a, stride_b,
                       QMAX: tl.constexpr, HAS_SMOOTH: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                       ROUND: tl.constexpr, MATH: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    rows = rows.to(tl.int64)
    offs = tl.arange(0, CHUNK)
    K = KA + KB
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for k in range(0, KA, CHUNK):
        h, m = _segment(a_ptr, stride_a, rows, r_ok, k, offs, KA, s_ptr, 0, False, HAS_SMOOTH, ROUND, MATH)
        amax = tl.maximum(amax, tl.max(tl.abs(h), axis=1))
    for k in range(0, KB, CHUNK):
        h, m = _segment(b_ptr, stride_b, rows, r_ok, k, offs, KB, s_ptr, KA, True, HAS_SMOOTH, ROUND, MATH)
        amax = tl.maximum(amax, tl.max(tl.abs(h), axis=1))
    scale, inv = _scale_inv(amax, clip, QMAX)
    for k in range(0, KA, CHUNK):
        h, m = _segment(a_ptr, stride_a, rows, r_ok, k, offs, KA, s_ptr, 0, False, HAS_SMOOTH, ROUND, MATH)
        tl.store(q_ptr + rows[:, None] * K + (k + offs)[None, :], _codes(h, scale[:, None], inv[:, None], QMAX, True), mask=m)
    for k in range(0, KB, CHUNK):
        h, m = _segment(b_ptr, stride_b, rows, r_ok, k, offs, KB, s_ptr, KA, True, HAS_SMOOTH, ROUND, MATH)
        tl.store(q_ptr + rows[:, None] * K + (KA + k + offs)[None, :],
                 _codes(h, scale[:, None], inv[:, None], QMAX, True), mask=m)
    tl.store(scale_ptr + rows, scale, mask=r_ok)


def _rows2d(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., K] -> [M, K] with unit column stride, without a copy when the layout allows."""
    if t.dtype not in _FLOAT:
        raise ValueError(f"{name} must be fp32/fp16/bf16, got {t.dtype}")
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check_quant(bits, inv_smooth, K):
    if bits not in (6, 8):
        raise ValueError(f"activation bits must be 6 or 8, got {bits}")
    if inv_smooth is not None and inv_smooth.shape != (K,):
        raise ValueError(f"inv_smooth must have shape ({K},), got {tuple(inv_smooth.shape)}")


def _mod_vector(v: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A modulation vector [B, 1, C] (or [B, C]) as a contiguous [B, C] for x [B, L, C]."""
    B, C = x.shape[0], x.shape[-1]
    v2 = v.reshape(v.shape[0], -1)
    if v2.shape != (B, C) and v2.shape != (1, C):
        raise ValueError(f"{name} must be [B, 1, C] = [{B}, 1, {C}] for x {tuple(x.shape)}, got {tuple(v.shape)}")
    return v2.expand(B, C).contiguous()


def norm_modulate_quant(x, shift, scale, inv_smooth, clip, bits: int, residual=None, gate=None,
                        config: dict | None = None):
    """LayerNorm(x') (1 + scale) + shift quantized per token, x' = x (+ residual * gate).

    x, residual [B, L, C]; shift, scale, gate [B, 1, C]. Returns (x' or None, codes int8 [B*L, C],
    scale fp32 [B*L, 1]); x' (the updated residual stream, x's dtype) only when residual is given.
    config (tuning; benchmarks/dev_kernel_sweep.py --parts norm): ROWS (rows per program, a power of
    two) and num_warps; None: by width."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got {tuple(x.shape)}")
    B, L, C = x.shape
    if C > MAX_ONEPASS_K:
        raise ValueError(f"norm_modulate_quant holds a row in registers: C <= {MAX_ONEPASS_K}, got {C}")
    _check_quant(bits, inv_smooth, C)
    if (residual is None) != (gate is None):
        raise ValueError("give both residual and gate, or neither")
    block = max(16, triton.next_power_of_2(C))
    # C = 3072 (block 4096): 2 rows with 4 warps; two H200 sweeps (2026-12-01): 0.78 and 0.88 ms against
    # 0.88 and 1.00 ms for the earlier 1 row with 8 warps (with the gated residual 1.03 / 1.01 vs 1.14 / 1.12)
    # C = 5120 (block 8192, Wan2.1-14B): one row over 16 warps, 16 columns a thread (not yet timed on a GPU)
    default = dict(ROWS=1, num_warps=16) if block == 8192 else \
        dict(ROWS=2 if block == 4096 else max(1, min(4, 4096 // block)), num_warps=4)
    cfg = merged_config(default, config, "norm_modulate_quant")
    rows = cfg["ROWS"]
    if not isinstance(rows, int) or rows < 1 or rows & (rows - 1):
        raise ValueError(f"ROWS must be a power of two, got {rows}")
    x2 = _rows2d(x, "x")
    M = x2.shape[0]
    codes = torch.empty((M, C), dtype=torch.int8, device=x.device)
    qscale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    xo = None
    y2 = g = x2
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        y2, g = _rows2d(residual, "residual"), _mod_vector(gate, x, "gate")
        xo = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if M == 0:
        return xo, codes, qscale
    sh, sc = _mod_vector(shift, x, "shift"), _mod_vector(scale, x, "scale")
    s = inv_smooth.float().contiguous() if inv_smooth is not None else qscale
    xo2 = xo.view(M, C) if xo is not None else x2
    _norm_modulate_quant_kernel[(triton.cdiv(M, rows),)](
        x2, y2, g, xo2, sh, sc, s, codes, qscale, float(clip), M, C, L, x2.stride(0), y2.stride(0), xo2.stride(0),
        sh.stride(0), 1e-6, QMAX=2 ** (bits - 1) - 1, RESIDUAL=residual is not None, HAS_SMOOTH=inv_smooth is not None,
        ROWS=rows, BLOCK=block, ROUND=_round_code(x.dtype), num_warps=cfg["num_warps"])
    return xo, codes, qscale


# Two passes (absmax, then codes re-reading the rows from L2 and recomputing GELU); MATH None: by
# device (_math_code). A one-pass kernel holding whole rows in registers measured slower for linear2 on an H200 twice
# (5.30 vs 3.82 ms, then 5.34 vs 3.36 ms; fc2 2.84 vs 2.92 ms) and was dropped (benchmarks/results/, dev7b).
# 4 rows x 1024 columns with 4 warps (and tanh.approx): fc2 2.25 / linear2 2.51 ms against 2.43 / 3.02
# for 2 x 2048 with 8 warps, the earlier launch (one H200 sweep, 2026-12-01).
GELU_CONFIG = dict(ROWS=4, CHUNK=1024, num_warps=4, MATH=None)


def gelu_quant(hid, inv_smooth, clip, bits: int, prefix=None, config: dict | None = None):
    """[prefix | GELU-tanh(hid)] quantized per token (prefix: e.g. the attention output; optional).
    hid [..., KB], prefix [..., KA] with the same leading dims. Returns (codes [M, KA + KB], scale [M, 1]).
    config (tuning; benchmarks/dev_kernel_sweep.py --parts gelu): overrides of GELU_CONFIG (ROWS rows
    per program, CHUNK columns per piece, num_warps, MATH: _gelu_tanh's instruction forms, None = by device)."""
    b2 = _rows2d(hid, "hid")
    M, KB = b2.shape
    a2, KA = b2, 0
    if prefix is not None:
        if prefix.shape[:-1] != hid.shape[:-1]:
            raise ValueError(f"prefix {tuple(prefix.shape)} and hid {tuple(hid.shape)} differ in leading dims")
        if prefix.dtype != hid.dtype:
            raise ValueError(f"prefix ({prefix.dtype}) and hid ({hid.dtype}) must share a dtype")
        a2 = _rows2d(prefix, "prefix")
        KA = a2.shape[1]
    K = KA + KB
    _check_quant(bits, inv_smooth, K)
    cfg = merged_config(GELU_CONFIG, config, "gelu_quant")
    math = _math_code(hid.device) if cfg["MATH"] is None else cfg["MATH"]
    if math not in (0, 1) or (math == 1 and _math_code(hid.device) == 0):
        raise ValueError(f"gelu_quant MATH must be 0 (tl.math) or 1 (PTX tanh.approx: NVIDIA sm_75+ GPUs only), "
                         f"got {cfg['MATH']!r} for {hid.device} tensors")
    codes = torch.empty((M, K), dtype=torch.int8, device=hid.device)
    qscale = torch.empty((M, 1), dtype=torch.float32, device=hid.device)
    if M == 0:
        return codes, qscale
    s = inv_smooth.float().contiguous() if inv_smooth is not None else qscale
    chunk = min(cfg["CHUNK"], max(16, triton.next_power_of_2(K)))
    _gelu_quant_kernel[(triton.cdiv(M, cfg["ROWS"]),)](
        a2, b2, s, codes, qscale, float(clip), M, KA, KB, a2.stride(0), b2.stride(0), QMAX=2 ** (bits - 1) - 1,
        HAS_SMOOTH=inv_smooth is not None, ROWS=cfg["ROWS"], CHUNK=chunk, ROUND=_round_code(hid.dtype),
        MATH=math, num_warps=cfg["num_warps"])
    return codes, qscale

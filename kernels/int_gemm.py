"""W8A8 and W4A8 GEMMs (Triton): int8 activations x int8 / packed-int4 weights, int32 accumulation,
per-token x per-output-channel scales and bias in the epilogue, bf16 (or given dtype) out. The epilogue can
also add a low-rank side path h @ up^T (a LoRA beside the packed weight: `lora`) in fp32 before the output
is rounded, so a LoRA costs no pass over the output of its own.

Weight layout (prepare_weight, done once at load time):
- 8/6-bit: int8 codes [N, K], K contiguous. int8 tensor-core MMAs on Hopper take both operands
  K-major, so the [N, K] storage is already the layout the MMA wants; no transpose is made.
- 4-bit: int8 bytes [N, K/2] where byte j holds code k=j in its low nibble and code k=j+K/2 in its
  high nibble ("split halves"). The kernel loads one byte tile, sign-extends both nibbles with two
  shifts, and multiplies them against the activation tiles at k and k + K/2: two MMAs, no in-register
  interleave. Checkpoints keep int4.pack_int4's interleaved format; this is a runtime layout only.

4-bit execution ("unpack"): at the video token counts (M ~ 1e5) the GEMM is compute bound, and the
in-kernel nibble unpack costs ~45% of the int8 MMA rate on H100 (575 vs 1,030 TOPS measured: Hopper
MMAs read B from shared memory, so unpacked nibbles make a shared -> register -> shared round trip).
So for large M ("separate", the default above SEPARATE_MIN_M rows) a small kernel expands the 4-bit
weight into a transient int8 [N, K] buffer (N*K bytes, ~1% of the GEMM's time) and the W8A8 kernel
runs; the stored weight stays 4-bit. Small M ("fused") unpacks inside the GEMM, where bytes matter.

Kernels: for M >= TMA_MIN_M on Hopper a persistent kernel with TMA tile loads and hand-picked tiles
and epilogues (TMA_CONFIGS) runs: 1.44-1.60x bf16 F.linear at the six HunyuanVideo shapes on H100 in
the sweep that picked them, 1.39-1.70x in the benchmark run after (the autotuned pointer kernel serves
small M, older GPUs and the CPU interpreter). The 8-bit MMA rate bounds it: cuBLAS fp8
(torch._scaled_mm) measured 1.31-1.45x in that run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpreting
from .int4 import unpack_int4

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class PreparedWeight:
    """A weight laid out for int_gemm: `data` (int8), w_bits, in/out features, scales [N] fp32."""

    def __init__(self, data: torch.Tensor, w_bits: int, in_features: int, scale: torch.Tensor):
        self.data, self.w_bits, self.in_features = data, w_bits, in_features
        self.out_features = data.shape[0]
        self.scale = scale

    def to(self, device) -> "PreparedWeight":
        return PreparedWeight(self.data.to(device), self.w_bits, self.in_features, self.scale.to(device))


def prepare_weight(w: torch.Tensor, w_bits: int, scale: torch.Tensor) -> PreparedWeight:
    """QuantLinear storage (int8 codes [N, K], or uint8 pack_int4 [N, K/2]) + scale [N, 1] -> kernel layout."""
    if w_bits not in (4, 6, 8):
        raise ValueError(f"w_bits must be 4, 6 or 8, got {w_bits}")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K] (or [N, K/2] packed), got shape {tuple(w.shape)}")
    n = w.shape[0]
    if scale.numel() != n:
        raise ValueError(f"weight scale has {scale.numel()} entries, expected one per output channel ({n})")
    scale = scale.reshape(n).float().contiguous()
    if w_bits == 4:
        if w.dtype != torch.uint8:
            raise ValueError(f"4-bit weights must be uint8 packed by int4.pack_int4, got {w.dtype}")
        codes = unpack_int4(w)
        k = codes.shape[1]
        lo, hi = codes[:, : k // 2].to(torch.int16), codes[:, k // 2:].to(torch.int16)
        data = ((lo & 0xF) | ((hi & 0xF) << 4)).to(torch.uint8).view(torch.int8).contiguous()
        return PreparedWeight(data, 4, k, scale)
    if w.dtype != torch.int8:
        raise ValueError(f"{w_bits}-bit weights must be int8 codes, got {w.dtype}")
    return PreparedWeight(w.contiguous(), w_bits, w.shape[1], scale)


@triton.jit
def _lora_tile(y, offs_m, offs_n, M, N, h_ptr, u_ptr, R, LORA_RB: tl.constexpr, LORA_PREC: tl.constexpr):
    """y + h[offs_m] @ u[offs_n]^T: a LoRA side path's up projection added to an fp32 output tile before
    it is stored (h [M, R] = x down^T, u [N, R] = the scaled up weights, R a multiple of LORA_RB), so
    the low-rank term costs no pass over the output of its own. Rows / columns past M / N wrap (their
    results are never stored)."""
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    offs_r = tl.arange(0, LORA_RB)
    for r in range(0, R, LORA_RB):
        h = tl.load(h_ptr + rm[:, None] * R + r + offs_r[None, :])
        u = tl.load(u_ptr + rn[None, :] * R + r + offs_r[:, None])
        if LORA_PREC == "ieee":   # fp32 side paths, and the CPU interpreter (its half-precision dots are not exact)
            h, u = h.to(tl.float32), u.to(tl.float32)
        y = tl.dot(h, u, y, input_precision=LORA_PREC)
    return y


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, c_ptr, stride_cm, h_ptr, u_ptr, R,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, LORA_RB: tl.constexpr, LORA_PREC: tl.constexpr):
    """Shared by both GEMM kernels: int32 tile -> per-token x per-channel scales (+ bias, + LoRA) -> output dtype."""
    mmask = offs_m < M
    nmask = offs_n < N
    sa = tl.load(sa_ptr + offs_m, mask=mmask, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=nmask, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    if HAS_LORA:
        y = _lora_tile(y, offs_m, offs_n, M, N, h_ptr, u_ptr, R, LORA_RB, LORA_PREC)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _int_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K_ITER, HALF,
                     stride_am, stride_bn, stride_cm, M_BUCKET, h_ptr, u_ptr, R,
                     W4: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                     HAS_LORA: tl.constexpr, LORA_RB: tl.constexpr, LORA_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles share each weight tile while it is in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)  # wrapped rows/cols: loads stay in bounds, stores are masked
    rn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K_ITER, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            km = offs_k < K_ITER - k
            a = tl.load(a_ptrs, mask=km[None, :], other=0)
            b = tl.load(b_ptrs, mask=km[:, None], other=0)
        if W4:
            if EVEN_K:
                a2 = tl.load(a_ptrs + HALF)
            else:
                a2 = tl.load(a_ptrs + HALF, mask=km[None, :], other=0)
            lo = (b << 4) >> 4  # arithmetic shifts on int8 sign-extend each nibble
            hi = b >> 4
            acc = tl.dot(a, lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a2, hi, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, c_ptr, stride_cm, h_ptr, u_ptr, R,
              HAS_BIAS, HAS_LORA, LORA_RB, LORA_PREC)


@triton.jit
def _unpack_w4_kernel(p_ptr, c_ptr, HALF, BLOCK: tl.constexpr):
    """Split-halves bytes [N, K/2] -> int8 codes [N, K] (low nibble -> k, high nibble -> k + K/2)."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < HALF
    b = tl.load(p_ptr + n * HALF + offs, mask=m, other=0)
    tl.store(c_ptr + n * 2 * HALF + offs, (b << 4) >> 4, mask=m)
    tl.store(c_ptr + n * 2 * HALF + HALF + offs, b >> 4, mask=m)


def unpack_prepared_w4(w: "PreparedWeight") -> "PreparedWeight":
    """The int8 [N, K] (W8A8-layout) twin of a prepared 4-bit weight, made on the fly."""
    n, half = w.data.shape
    codes = torch.empty((n, 2 * half), dtype=torch.int8, device=w.data.device)
    blk = 1024
    _unpack_w4_kernel[(n, triton.cdiv(half, blk))](w.data, codes, half, BLOCK=blk, num_warps=4)
    return PreparedWeight(codes, 8, w.in_features, w.scale)


SEPARATE_MIN_M = 1024  # at or above this many rows, 4-bit weights are expanded to int8 per call


@triton.jit
def _tma_tile_coords(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row-tiles share each weight tile while it is in L2."""
    group = GROUP_M * num_n
    first_m = (tile // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % size_m, (tile % group) // size_m


@triton.jit
def _scaled_tile(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, h_ptr, u_ptr, R, HAS_BIAS: tl.constexpr,
                 HAS_LORA: tl.constexpr, LORA_RB: tl.constexpr, LORA_PREC: tl.constexpr):
    """int32 tile -> fp32 with the per-token x per-channel scales (+ bias, + LoRA), as _epilogue computes it."""
    sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
    sb = tl.load(sb_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_LORA:
        y = _lora_tile(y, offs_m, offs_n, M, N, h_ptr, u_ptr, R, LORA_RB, LORA_PREC)
    return y


@triton.jit
def _int_gemm_tma_kernel(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, c_ptr, M, N, K, stride_cm,
                         h_ptr, u_ptr, R, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                         LORA_RB: tl.constexpr, LORA_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr,
                         TMA_STORE: tl.constexpr, SUBTILE: tl.constexpr, FLATTEN: tl.constexpr,
                         WARP_SPEC: tl.constexpr):
    """Persistent W8A8 variant: TMA tile loads (out-of-bounds rows read as zero), one program per SM
    walking the output tiles in grouped order. TMA_STORE: the output tile leaves through a TMA store
    (asynchronous, rows past M clipped by the hardware) instead of masked pointer stores; SUBTILE: in
    two [BLOCK_M, BLOCK_N / 2] halves (half the staging shared memory). FLATTEN / WARP_SPEC: Triton's
    loop flattening (the next tile's loads pipeline under this tile's epilogue) / warp specialization."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGS, flatten=FLATTEN, warp_specialize=WARP_SPEC):
        pid_m, pid_n = _tma_tile_coords(tile, num_m, num_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kt in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kt * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, kt * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        if TMA_STORE:
            if SUBTILE:
                HALF_N: tl.constexpr = BLOCK_N // 2
                acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
                offs_n = pid_n * BLOCK_N + tl.arange(0, HALF_N)
                y0 = _scaled_tile(acc0, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, h_ptr, u_ptr, R,
                                  HAS_BIAS, HAS_LORA, LORA_RB, LORA_PREC)
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y0.to(c_desc.dtype))
                y1 = _scaled_tile(acc1, offs_m, offs_n + HALF_N, M, N, sa_ptr, sb_ptr, bias_ptr, h_ptr, u_ptr, R,
                                  HAS_BIAS, HAS_LORA, LORA_RB, LORA_PREC)
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + HALF_N], y1.to(c_desc.dtype))
            else:
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                y = _scaled_tile(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, h_ptr, u_ptr, R,
                                  HAS_BIAS, HAS_LORA, LORA_RB, LORA_PREC)
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y.to(c_desc.dtype))
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            _epilogue(acc, offs_m, offs_n, M, N, sa_ptr, sb_ptr, bias_ptr, c_ptr, stride_cm, h_ptr, u_ptr, R,
                      HAS_BIAS, HAS_LORA, LORA_RB, LORA_PREC)


# Persistent-TMA launches: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, options]) where options is a
# "+"-joined subset of TMA_OPTIONS. Picked on H100 at M = 119,056 from two sweeps of
# benchmarks/dev_kernel_sweep.py --parts gemm (2026-11-25, benchmarks/results/ run 6; speed-up vs bf16
# F.linear, interleaved timing, run-to-run noise ~5%): the TMA-store epilogue in halves with a
# flattened tile loop at K = 3072 (qkv 1.36 -> 1.42-1.46x, proj 1.35 -> 1.46-1.48x), and 4 stages
# with a flattened loop for fc1 / fc2 / linear1 / linear2 (1.44 / 1.57 / 1.52 / 1.60x in the second).
TMA_OPTIONS = ("store", "subtile", "flatten", "ws")
TMA_CONFIGS = {
    (3072, 9216): (256, 128, 128, 8, 3, "store+subtile+flatten"),    # qkv
    (3072, 3072): (128, 256, 128, 8, 3, "store+subtile+flatten"),    # proj
    (3072, 12288): (256, 128, 128, 8, 4, "flatten"),                 # mlp fc1
    (12288, 3072): (256, 128, 128, 8, 4, "flatten"),                 # mlp fc2
    (3072, 21504): (256, 128, 128, 8, 4, "flatten"),                 # single linear1
    (15360, 3072): (256, 128, 128, 8, 4, "flatten"),                 # single linear2
}
TMA_MIN_M = 8192  # persistent tiles pay off once there are many output tiles per SM
TMA_MIN_N = 256

# A LoRA side path's rank R is a multiple of this (its tiles are [BLOCK_M, LORA_RANK_MULTIPLE] x
# [LORA_RANK_MULTIPLE, BLOCK_N] dots, 16 being the smallest K of a tensor-core MMA); callers pad with
# zero rows / columns (quantsparse_core.quant.low_rank), which add exactly nothing.
LORA_RANK_MULTIPLE = 16


def _tma_config(K: int, N: int) -> tuple:
    return TMA_CONFIGS.get((K, N), (256, 128, 128, 8, 4, "flatten") if K >= 8192 or N >= 12288
                           else (256, 128, 128, 8, 3, "store+subtile+flatten"))


def _tma_options(tile: tuple) -> set:
    opts = set(o for o in (tile[5].split("+") if len(tile) > 5 and tile[5] else ()) if o)
    unknown = opts - set(TMA_OPTIONS)
    if unknown:
        raise ValueError(f"unknown TMA tile options {sorted(unknown)}; use a '+'-joined subset of {TMA_OPTIONS}")
    if "subtile" in opts and "store" not in opts:
        raise ValueError("TMA tile option 'subtile' needs 'store' (it splits the TMA store)")
    return opts


def _use_tma(a: torch.Tensor, w: "PreparedWeight", tile: tuple | None) -> bool:
    """Hopper or newer, big M, 16-byte aligned rows (TMA's rules). In the CPU interpreter only when a
    tile is given (tests of the kernel's logic at small shapes)."""
    if w.w_bits == 4:
        return False
    if interpreting():
        if tile is None:
            return False
    elif not a.is_cuda or torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    K = a.shape[1]
    # N >= TMA_MIN_N: the default tiles were picked for the model's widths (N >= 3072); a LoRA's down
    # projection on int8 codes (N = its rank, e.g. 96, under one weight tile) runs on the pointer kernel
    return (tile is not None or (a.shape[0] >= TMA_MIN_M and w.out_features >= TMA_MIN_N)) and K % 16 == 0 \
        and a.stride(0) % 16 == 0 \
        and a.data_ptr() % 16 == 0 and w.data.data_ptr() % 16 == 0


def _lora_args(lora):
    """(h, u, R, HAS_LORA, LORA_PREC) kernel arguments for a checked side path, or its absence."""
    if lora is None:
        return None, None, 0, False, None
    h, u = lora
    return h, u, h.shape[1], True, ("ieee" if h.dtype == torch.float32 or interpreting() else None)


def _launch_tma(a, sa, w, bias, c, tile, lora=None):
    from triton.tools.tensor_descriptor import TensorDescriptor
    bm, bn, bk, warps, stages = tile[:5]
    opts = _tma_options(tile)
    M, K = a.shape
    N = w.out_features
    a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
    b_desc = TensorDescriptor.from_tensor(w.data, [bn, bk])
    store = "store" in opts and (N * c.element_size()) % 16 == 0 and c.data_ptr() % 16 == 0
    c_desc = TensorDescriptor.from_tensor(c, [bm, bn // 2 if "subtile" in opts else bn]) if store else a_desc
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    progs = min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    h, u, r, has_lora, prec = _lora_args(lora)
    _int_gemm_tma_kernel[(progs,)](a_desc, b_desc, c_desc, sa, w.scale, bias if bias is not None else w.scale, c,
                                   M, N, K, c.stride(0), h if has_lora else w.scale, u if has_lora else w.scale, r,
                                   HAS_BIAS=bias is not None, HAS_LORA=has_lora, LORA_RB=LORA_RANK_MULTIPLE,
                                   LORA_PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                                   BLOCK_K=bk, GROUP_M=8, NUM_PROGS=progs, TMA_STORE=store,
                                   SUBTILE=store and "subtile" in opts, FLATTEN="flatten" in opts,
                                   WARP_SPEC="ws" in opts, num_warps=warps, num_stages=stages)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# H100 candidates (BLOCK_K counts K per MMA; a 4-bit step covers 2 * BLOCK_K of K).
_CONFIGS = [
    _cfg(128, 256, 128, 8, 3),
    _cfg(256, 128, 128, 8, 3),
    _cfg(128, 128, 128, 8, 4),
    _cfg(128, 256, 64, 8, 4),
    _cfg(128, 256, 128, 8, 4),
    _cfg(256, 128, 128, 8, 4),
    _cfg(256, 128, 64, 8, 4),
    _cfg(128, 128, 128, 4, 4),
]
_tuned = triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K_ITER", "W4", "HAS_BIAS", "EVEN_K",
                                                "HAS_LORA"])(_int_gemm_kernel)
_INTERP = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)  # small tiles for the CPU interpreter


def _check_lora(lora, M: int, N: int):
    """The side path (h [M, R], u [N, R]) made contiguous, or a ValueError naming what is wrong with it."""
    if lora is None:
        return None
    h, u = lora
    if h.dim() != 2 or u.dim() != 2 or h.shape[0] != M or u.shape[0] != N or h.shape[1] != u.shape[1]:
        raise ValueError(f"LoRA side path must be h [M={M}, R] and up [N={N}, R], got {tuple(h.shape)} and {tuple(u.shape)}")
    if h.shape[1] == 0 or h.shape[1] % LORA_RANK_MULTIPLE:
        raise ValueError(f"LoRA side path rank {h.shape[1]} must be a positive multiple of {LORA_RANK_MULTIPLE} "
                         "(pad down / up with zeros)")
    if h.dtype != u.dtype or h.dtype not in OUT_DTYPES or h.device != u.device:
        raise ValueError(f"LoRA side path h and up must share one float dtype and device, got {h.dtype} / {u.dtype}")
    return h.contiguous(), u.contiguous()


def int_gemm(a: torch.Tensor, sa: torch.Tensor, w: PreparedWeight, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
             unpack: str = "auto", tma_tile: tuple | None = None, lora: tuple | None = None) -> torch.Tensor:
    """a int8 [M, K] codes, sa fp32 [M, 1] per-token scales, w from prepare_weight -> [M, N] out_dtype.

    Large M on Hopper (8/6-bit, or 4-bit expanded): persistent TMA kernel, tiles from TMA_CONFIGS
    (tma_tile=(BM, BN, BK, warps, stages[, "+"-joined TMA_OPTIONS]) overrides). Otherwise the pointer kernel, autotuned, or
    config: a fixed {BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages}.
    unpack (4-bit only): "fused" in the GEMM, "separate" to a transient int8 buffer, "auto" by M.
    lora: (h [M, R], up [N, R]) adds h @ up^T to the fp32 result in the epilogue (R % LORA_RANK_MULTIPLE == 0).
    """
    if not isinstance(w, PreparedWeight):
        raise ValueError("w must come from kernels.int_gemm.prepare_weight(codes_or_packed, w_bits, scale)")
    if a.dtype != torch.int8 or a.dim() != 2:
        raise ValueError(f"activations must be 2-D int8 codes [M, K], got {a.dtype} {tuple(a.shape)}")
    M, K = a.shape
    if K != w.in_features:
        raise ValueError(f"activation K={K} does not match the weight's in_features={w.in_features}")
    if w.w_bits == 4 and K % 2:
        raise ValueError(f"4-bit weights need an even K, got {K}")
    if sa.numel() != M or sa.dtype != torch.float32:
        raise ValueError(f"activation scale must be fp32 with one entry per row ({M}), got {sa.dtype} {tuple(sa.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if unpack not in ("auto", "fused", "separate"):
        raise ValueError(f"unpack must be 'auto', 'fused' or 'separate', got {unpack!r}")
    if w.w_bits == 4 and (unpack == "separate" or (unpack == "auto" and M >= SEPARATE_MIN_M)):
        w = unpack_prepared_w4(w)
    N = w.out_features
    if bias is not None:
        if bias.numel() != N:
            raise ValueError(f"bias has {bias.numel()} entries, expected {N}")
        bias = bias.reshape(N).float().contiguous()
    if a.stride(1) != 1:
        a = a.contiguous()
    sa = sa.reshape(M).contiguous()
    lora = _check_lora(lora, M, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    if config is None and _use_tma(a, w, tma_tile):
        _launch_tma(a, sa, w, bias, c, tma_tile or _tma_config(K, N), lora)
        return c
    k_iter = K // 2 if w.w_bits == 4 else K
    args = (a, w.data, sa, w.scale, bias if bias is not None else w.scale, c, M, N, k_iter, K // 2,
            a.stride(0), w.data.stride(0), c.stride(0), min(triton.next_power_of_2(M), 65536))
    h, u, r, has_lora, prec = _lora_args(lora)
    args += (h if has_lora else w.scale, u if has_lora else w.scale, r)
    W4, HAS_BIAS = w.w_bits == 4, bias is not None
    lora_kw = dict(HAS_LORA=has_lora, LORA_RB=LORA_RANK_MULTIPLE, LORA_PREC=prec)
    if config is None and interpreting():
        config = _INTERP
    if config is not None:
        cfg = dict(config)
        warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        _int_gemm_kernel[grid](*args, W4=W4, HAS_BIAS=HAS_BIAS, EVEN_K=k_iter % cfg["BLOCK_K"] == 0,
                               num_warps=warps, num_stages=stages, **lora_kw, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _tuned[grid](*args, W4=W4, HAS_BIAS=HAS_BIAS, EVEN_K=k_iter % 128 == 0, **lora_kw)
    return c

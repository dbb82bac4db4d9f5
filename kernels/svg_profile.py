"""SVG head classification (Triton): sampled-row errors of the spatial and temporal band masks.

svg_masks classifies each head by comparing, for 64 sampled video query rows, exact attention with
attention restricted to the spatial / the temporal band. In PyTorch at HunyuanVideo 720p (B=1,
H=24, L=119,056, D=128, bf16) that costs 27.5 ms per layer on an H100, 40% of it strided copies of
k/v to fp32 and 30% padding copies in split_k_matmul; at every SSAR refresh of 59 layers that is
~14 s of a 50-step run. The work itself is reading k and v once (1.5 GB) and ~190 GFLOP: ~1-3 ms.

Here one program owns (batch*head, key split, tile of sampled rows): it loads the gathered q rows
once, streams its keys in BLOCK_N tiles and keeps three online-softmax states (running max, sum,
fp32 accumulator): all keys, the keys the spatial band allows and those the temporal band allows
(allowed = band[query block, key block], the temporal blocks read through `inv`). The splits'
partial states are merged in PyTorch (log-sum-exp), then the per-head MSEs are taken.

Precision: scores from the inputs' own dtype with fp32 accumulation (bf16/fp16 products are exact
in fp32; fp32 inputs use IEEE products). P @ V: for bf16 v, p is split into bf16 hi + lo parts and
multiplied on the tensor cores (v is exact in bf16, so the products are exact and p keeps 16
significant bits, relative error <= 2^-17); for fp16/fp32 v, fp32 IEEE products. The reference is
kernels/svg_profile_ref.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .interpreter import interpreting

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
WAVES = 4                # programs per SM the key splits aim for on CUDA (full waves: 24 heads x 22 splits = 4 x 132)
INTERPRETER_SPLITS = 3   # under the CPU interpreter: enough to exercise the merge, few programs
# head_dim -> (BLOCK_M rows, BLOCK_N keys, num_warps, num_stages). Three fp32 [BLOCK_M, D] accumulators
# live in registers, hence BLOCK_M * D <= 8192 with 8 warps. Not yet tuned on a GPU.
_CONFIGS = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 4, 2), 128: (64, 64, 8, 2), 256: (32, 64, 8, 2)}


@triton.jit
def _pv(acc, p, v, PV_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """acc + p @ v with near-fp32 accuracy. PV_SPLIT (bf16 v): p = hi + lo, both bf16, two tensor-core
    products that are exact; else fp32 IEEE. The interpreter's bf16 dot is not exact, so there the
    same bf16 parts are multiplied as fp32."""
    if PV_SPLIT:
        hi = p.to(tl.bfloat16)
        lo = (p - hi.to(tl.float32)).to(tl.bfloat16)
        if INTERP:
            v32 = v.to(tl.float32)
            acc = tl.dot(hi.to(tl.float32), v32, acc, input_precision="ieee")
            acc = tl.dot(lo.to(tl.float32), v32, acc, input_precision="ieee")
        else:
            acc = tl.dot(hi, v, acc)
            acc = tl.dot(lo, v, acc)
    else:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _log2_bias(bias):
    """bias * log2(e) without overflowing a finite mask value (-finfo.max) to -inf: as in PyTorch, a
    row whose keys all carry -finfo.max averages them, one whose keys are all -inf gives 0."""
    scaled = tl.maximum(bias, -2.3e38) * 1.4426950408889634  # -finfo.max / log2(e) = -2.36e38
    return tl.where(bias == float("-inf"), bias, scaled)


@triton.jit
def _update(m_i, l_i, acc, s, v, PV_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """One online-softmax step on log2-scaled scores s (-inf = not allowed). A row with nothing
    allowed so far keeps m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _pv(acc * alpha[:, None], p, v, PV_SPLIT, INTERP)
    return m_new, l_i, acc


@triton.jit
def _store(M_OUT, L_OUT, ACC_OUT, slot, offs_m, offs_d, m_ok, m_i, l_i, acc, N_ROWS, HEAD_D: tl.constexpr):
    """One partial state into row `slot` of the [variant, split, batch*head] grid of slots."""
    base = slot.to(tl.int64) * N_ROWS
    tl.store(M_OUT + base + offs_m, m_i, mask=m_ok)
    tl.store(L_OUT + base + offs_m, l_i, mask=m_ok)
    tl.store(ACC_OUT + (base + offs_m[:, None]) * HEAD_D + offs_d[None, :], acc, mask=m_ok[:, None])


# Resolution-dependent sizes are not specialised on: one compile serves every resolution (no step stalls).
@triton.jit(do_not_specialize=["L", "BH", "N_ROWS", "NB", "RT", "S", "TILES_PER_SPLIT", "sbb"])
def _svg_partials(Q, K, V, ROWS, BAND, INV, BIAS, M_OUT, L_OUT, ACC_OUT,
                  sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sbb,
                  L, H, BH, N_ROWS, NB, RT, S, TILES_PER_SPLIT, qk_scale,
                  BLOCK: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_BIAS: tl.constexpr, QK_IEEE: tl.constexpr, PV_SPLIT: tl.constexpr, INTERP: tl.constexpr):
    # Row tiles vary fastest, so programs that read the same keys run side by side (L2 reuse).
    pid = tl.program_id(0)
    rt = pid % RT
    split = (pid // RT) % S
    bh = pid // (RT * S)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)

    offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    arange_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < N_ROWS
    rows = tl.load(ROWS + h * N_ROWS + offs_m, mask=m_ok, other=0)
    q = tl.load(Q + b * sqb + h * sqh + rows.to(tl.int64)[:, None] * sql + offs_d[None, :],
                mask=m_ok[:, None], other=0.0)
    if QK_IEEE:
        q = q.to(tl.float32)
    band_spatial = BAND + (rows // BLOCK) * NB                 # each row's band row, original order
    band_temporal = BAND + (tl.load(INV + rows) // BLOCK) * NB  # ... and in the temporal order
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = BIAS + b * sbb

    m_e = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_e = tl.zeros([BLOCK_M], tl.float32)
    acc_e = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    m_s, l_s, acc_s = m_e, l_e, acc_e
    m_t, l_t, acc_t = m_e, l_e, acc_e

    t0 = split * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, tl.cdiv(L, BLOCK_N))
    for t in range(t0, t1):
        n0 = t * BLOCK_N
        n_ok = n0 + arange_n < L
        kt = tl.load(k_base + n0.to(tl.int64) * skl + arange_n[None, :] * skl + offs_d[:, None],
                     mask=n_ok[None, :], other=0.0)
        v = tl.load(v_base + n0.to(tl.int64) * svl + arange_n[:, None] * svl + offs_d[None, :],
                    mask=n_ok[:, None], other=0.0)
        if QK_IEEE:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt) * qk_scale
        if HAS_BIAS:
            bias = _log2_bias(tl.load(bias_base + n0 + arange_n, mask=n_ok, other=0.0).to(tl.float32))
            s = s + tl.where(n_ok, bias, float("-inf"))[None, :]
        else:
            s = s + tl.where(n_ok, 0.0, float("-inf"))[None, :]
        # BLOCK_N divides BLOCK: the whole tile lies in one spatial key block.
        ok_s = tl.load(band_spatial + n0 // BLOCK) != 0
        kb_t = tl.load(INV + n0 + arange_n, mask=n_ok, other=0) // BLOCK
        ok_t = tl.load(band_temporal[:, None] + kb_t[None, :]) != 0
        m_e, l_e, acc_e = _update(m_e, l_e, acc_e, s, v, PV_SPLIT, INTERP)
        m_s, l_s, acc_s = _update(m_s, l_s, acc_s, tl.where(ok_s[:, None], s, float("-inf")), v, PV_SPLIT, INTERP)
        m_t, l_t, acc_t = _update(m_t, l_t, acc_t, tl.where(ok_t, s, float("-inf")), v, PV_SPLIT, INTERP)

    slot = split * BH + bh  # variants (exact, spatial, temporal) are S * BH slots apart
    _store(M_OUT, L_OUT, ACC_OUT, slot, offs_m, offs_d, m_ok, m_e, l_e, acc_e, N_ROWS, HEAD_D)
    _store(M_OUT, L_OUT, ACC_OUT, slot + S * BH, offs_m, offs_d, m_ok, m_s, l_s, acc_s, N_ROWS, HEAD_D)
    _store(M_OUT, L_OUT, ACC_OUT, slot + 2 * S * BH, offs_m, offs_d, m_ok, m_t, l_t, acc_t, N_ROWS, HEAD_D)


# ---- host side ------------------------------------------------------------------------------------
def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> bool:
    """Whether the kernel takes these inputs (else callers keep their PyTorch path)."""
    d = q.shape[-1] if q.ndim == 4 else 0
    return (q.dtype in _FLOAT and q.dtype == k.dtype == v.dtype and 16 <= d <= 256 and not d & (d - 1)
            and block > 0 and block % 16 == 0)


def _check(q, k, v, rows, band, inv, block, key_bias):
    if not (q.ndim == 4 and q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must all be [B, H, L, D] of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _FLOAT or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, heads, length, d = q.shape
    if b == 0 or heads == 0 or length == 0:
        raise ValueError(f"q, k, v are empty: {tuple(q.shape)}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim {d} is not supported by the Triton kernel: use a power of two in 16..256 "
                         "(or the reference, QUANTSPARSE_KERNELS=torch)")
    if not isinstance(block, int) or block <= 0 or block % 16:
        raise ValueError(f"block {block!r} is not supported by the Triton kernel: use a multiple of 16")
    nb = -(-length // block)
    tensors = dict(k=k, v=v, rows=rows, band=band, inv=inv, key_bias=key_bias)
    wrong = [name for name, t in tensors.items() if t is not None and t.device != q.device]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} must be on q's device {q.device}")
    if rows.ndim != 2 or rows.shape[0] != heads or rows.shape[1] == 0 or rows.is_floating_point():
        raise ValueError(f"rows must be an integer [H={heads}, n >= 1] tensor of query rows, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    if tuple(band.shape) != (nb, nb) or band.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise ValueError(f"band must be a bool [nb, nb] = [{nb}, {nb}] block table for L={length} and block {block}, "
                         f"got {band.dtype} {tuple(band.shape)}")
    if inv.ndim != 1 or inv.numel() != length or inv.is_floating_point():
        raise ValueError(f"inv must be an integer [L={length}] index (inverse temporal permutation), "
                         f"got {inv.dtype} {tuple(inv.shape)}")
    if key_bias is not None:
        if key_bias.ndim != 2 or key_bias.shape[1] != length or key_bias.shape[0] not in (1, b):
            raise ValueError(f"key_bias must be [B or 1, L={length}], got {tuple(key_bias.shape)}")
        if not key_bias.is_floating_point():
            raise ValueError(f"key_bias must be floating, got {key_bias.dtype}")


def _splits(programs: int, tiles: int, device: torch.device) -> int:
    """Key splits so that all programs fill WAVES x the SMs (1 program per SM: the three fp32
    accumulators take most registers); a small constant in the interpreter."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = -(-WAVES * sms // programs)
    else:
        want = INTERPRETER_SPLITS
    return max(1, min(tiles, want))


def _tiles(n: int, d: int, block: int, fp32: bool, config: Optional[tuple]):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, P @ V mode) for n rows, head_dim d and mask block."""
    block_m, block_n, warps, stages, *rest = config or _CONFIGS[d]
    block_m = max(16, min(block_m, triton.next_power_of_2(n)))
    block_n = min(block_n, block & -block)  # a power of two that divides the mask block
    if fp32:
        block_n = min(block_n, 32)  # fp32 k/v tiles: shared memory
    pv = rest[0] if rest else "auto"
    return block_m, block_n, warps, stages, pv


def _merge(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp merge over dim 1 (the splits) of base-2 partial softmax states: m, l [V, S, R],
    acc [V, S, R, D] -> outputs [V, R, D]; a row with no allowed key anywhere gives 0."""
    top = m.amax(1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp2(m - top)
    den = (l * w).sum(1)
    num = (acc * w[..., None]).sum(1)
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def svg_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, band: torch.Tensor,
               inv: torch.Tensor, block: int, key_bias: Optional[torch.Tensor] = None, *,
               splits: Optional[int] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """[H, 2] float64 on q's device: per head, the mean over (batch, sampled rows, head_dim) of the
    squared difference between attention restricted to the spatial (column 0) / temporal (column 1)
    band and exact attention, as svg_masks computes it.

    q, k, v [B, H, L, D] (any strides, contiguous last dim preferred); rows [H, n] query rows in
    [0, L) (not checked: that would sync); band [nb, nb] bool block table; inv [L] each token's
    position in the temporal order; key_bias [B|1, L] additive (-inf allowed) or None.
    splits / config ((BLOCK_M, BLOCK_N, num_warps, num_stages[, "split" | "ieee"])): overrides for
    tests and tuning. No host sync.
    """
    _check(q, k, v, rows, band, inv, block, key_bias)
    b, heads, length, d = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n = rows.shape[1]
    block_m, block_n, warps, stages, pv = _tiles(n, d, block, q.dtype == torch.float32, config)
    pv_split = v.dtype == torch.bfloat16 if pv == "auto" else pv == "split"
    if pv_split and v.dtype != torch.bfloat16:
        raise ValueError(f"the split P @ V products need bf16 v (exact in bf16), got {v.dtype}")
    rt = -(-n // block_m)
    tiles = -(-length // block_n)
    s = splits if splits is not None else _splits(b * heads * rt, tiles, q.device)
    per_split = -(-tiles // max(1, min(int(s), tiles)))
    s = -(-tiles // per_split)
    rows32 = rows.to(torch.int32).contiguous()
    band8 = band.to(torch.uint8).contiguous()
    inv32 = inv.to(torch.int32).contiguous()
    if key_bias is not None:
        key_bias = key_bias if key_bias.stride(-1) == 1 else key_bias.contiguous()
    sbb = 0 if key_bias is None or key_bias.shape[0] == 1 else key_bias.stride(0)
    m = torch.empty(3, s, b * heads, n, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty(3, s, b * heads, n, d, dtype=torch.float32, device=q.device)
    _svg_partials[(rt * s * b * heads,)](
        q, k, v, rows32, band8, inv32, key_bias if key_bias is not None else m, m, l, acc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sbb,
        length, heads, b * heads, n, band8.shape[0], rt, s, per_split, LOG2E / math.sqrt(d),
        BLOCK=block, HEAD_D=d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=key_bias is not None,
        QK_IEEE=q.dtype == torch.float32 or interpreting(), PV_SPLIT=pv_split,
        INTERP=interpreting(), num_warps=warps, num_stages=stages)
    out = _merge(m.flatten(2), l.flatten(2), acc.flatten(2, 3))   # [3, B*H*n, D]
    diff = (out[1:] - out[0]).double().view(2, b, heads, n, d)
    return (diff ** 2).mean((1, 3, 4)).T.contiguous()


__all__ = ["svg_errors", "supports"]

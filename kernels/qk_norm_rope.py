"""q/k RMSNorm + RoPE (+ the joint-sequence layout) in one pass (Triton).

Each attention call of a HunyuanVideo block first normalises every q and k head row (RMSNorm over
head_dim with a per-stream weight), rotates it by RoPE, and lays q, k, v out as [B, H, L, D] (the
double blocks also join the text and video streams). Compiled by torch.inductor this was 6.4 ms per
720p single block and ~11 ms per double block on an H200, ~5x its traffic at copy bandwidth: the
[L, D/2, 2, 2] fp32 RoPE table (4x the bytes of the bf16 rows it rotates) was read again for every
head. Here one program owns BLOCK_L tokens, loads their table rows once and loops over all heads of
q and k (and copies v's heads, when asked), so the table is read once per token.

Math (kernels/qk_norm_rope_ref.py): F.rms_norm as torch >= 2.8 computes it (fp32, eps = fp32 machine
epsilon, x * rstd * w rounded once to the model dtype), then out_j = t[j,0] x_even + t[j,1] x_odd in
fp32, rounded to the model dtype. Bit-equal to the reference in the interpreter; on a GPU the
approximate rsqrt and the fused multiply-add can move a value by one unit of the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .producer_quant import _round_code, _round_to_model_dtype

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
FP32_EPS = 1.1920928955078125e-07


@triton.jit
def _norm_rope(x, w0, w1, t00, t01, t10, t11, eps, HALF: tl.constexpr, BLOCK_L: tl.constexpr,
               ROUND: tl.constexpr):
    """[BLOCK_L, 2 HALF] rows -> RMSNorm (weight w0 / w1 on even / odd channels) -> RoPE, fp32 out."""
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / (2 * HALF) + eps)
    return scaled_rope(xf, rstd, w0, w1, t00, t01, t10, t11, HALF, BLOCK_L, ROUND)


@triton.jit
def scaled_rope(xf, rstd, w0, w1, t00, t01, t10, t11, HALF: tl.constexpr, BLOCK_L: tl.constexpr,
                ROUND: tl.constexpr):
    """fp32 rows [BLOCK_L, 2 HALF] times their rstd and the weight (rounded once to the model dtype, as
    F.rms_norm), then RoPE (rounded again); fp32 out. Shared with kernels.wan_qk_norm_rope."""
    x0, x1 = tl.split(tl.reshape(xf, (BLOCK_L, HALF, 2)))
    n0 = _round_to_model_dtype(x0 * rstd[:, None] * w0[None, :], ROUND)
    n1 = _round_to_model_dtype(x1 * rstd[:, None] * w1[None, :], ROUND)
    o0 = _round_to_model_dtype(t00 * n0 + t01 * n1, ROUND)
    o1 = _round_to_model_dtype(t10 * n0 + t11 * n1, ROUND)
    return tl.reshape(tl.join(o0, o1), (BLOCK_L, 2 * HALF))


@triton.jit
def token_block(L, HALF: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's batch (program_id(1)) and tokens [pid * BLOCK_L, +BLOCK_L): (b, token offsets as int64,
    their in-range mask, pair offsets [HALF], channel offsets [2 HALF]). Shared with kernels.wan_qk_norm_rope."""
    b = tl.program_id(1).to(tl.int64)
    offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    return b, offs_l.to(tl.int64), l_ok, tl.arange(0, HALF), tl.arange(0, 2 * HALF)


@triton.jit
def rope_rows(T, rows, stl, offs_p, m):
    """The four [rows, HALF] entries of the fp32 [.., L, D/2, 2, 2] table at these rows (T: this batch's table)."""
    trow = T + rows[:, None] * stl + offs_p[None, :] * 4
    return (tl.load(trow, mask=m, other=0.0), tl.load(trow + 1, mask=m, other=0.0),
            tl.load(trow + 2, mask=m, other=0.0), tl.load(trow + 3, mask=m, other=0.0))


@triton.jit
def _qk_norm_rope_kernel(Q, K, V, WQ, WK, T, QO, KO, VO, L, row0, H, eps,
                         sqb, sql, sqh, skb, skl, skh, svb, svl, svh, stb, stl, sob, soh, sol,
                         HALF: tl.constexpr, BLOCK_L: tl.constexpr, HAS_V: tl.constexpr, ROUND: tl.constexpr):
    """Tokens [pid * BLOCK_L, +BLOCK_L) of one stream (batch program_id(1)), written at rows row0 + l
    of the [B, H, L_out, D] outputs; the table is indexed by that joint row."""
    b, offs_l, l_ok, offs_p, offs_d = token_block(L, HALF, BLOCK_L)
    t00, t01, t10, t11 = rope_rows(T + b * stb, row0 + offs_l, stl, offs_p, l_ok[:, None])
    wq0 = tl.load(WQ + 2 * offs_p).to(tl.float32)
    wq1 = tl.load(WQ + 2 * offs_p + 1).to(tl.float32)
    wk0 = tl.load(WK + 2 * offs_p).to(tl.float32)
    wk1 = tl.load(WK + 2 * offs_p + 1).to(tl.float32)
    dt = QO.dtype.element_ty
    orow = b * sob + (row0 + offs_l)[:, None] * sol + offs_d[None, :]
    in_q = Q + b * sqb + offs_l[:, None] * sql + offs_d[None, :]
    in_k = K + b * skb + offs_l[:, None] * skl + offs_d[None, :]
    in_v = V + b * svb + offs_l[:, None] * svl + offs_d[None, :]
    qo, ko, vo = QO + orow, KO + orow, VO + orow
    m = l_ok[:, None]
    for _ in range(0, H):  # pointers advance by one head per iteration (64-bit pointer arithmetic)
        q = tl.load(in_q, mask=m, other=0.0)
        tl.store(qo, _norm_rope(q, wq0, wq1, t00, t01, t10, t11, eps, HALF, BLOCK_L, ROUND).to(dt), mask=m)
        k = tl.load(in_k, mask=m, other=0.0)
        tl.store(ko, _norm_rope(k, wk0, wk1, t00, t01, t10, t11, eps, HALF, BLOCK_L, ROUND).to(dt), mask=m)
        if HAS_V:
            tl.store(vo, tl.load(in_v, mask=m, other=0.0), mask=m)
        in_q += sqh
        in_k += skh
        in_v += svh
        qo += soh
        ko += soh
        vo += soh


def _heads(qkv: torch.Tensor, heads: int):
    """[B, L, 3*H*D] -> q, k, v as [B, L, H, D] views (unit last stride)."""
    b, l, c = qkv.shape
    if c % (3 * heads):
        raise ValueError(f"qkv's last dim {c} is not 3 x heads ({heads}) x head_dim")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    return qkv.view(b, l, 3, heads, c // (3 * heads)).unbind(2)


def supports(qkv: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes this input (else the caller keeps its PyTorch/compiled path)."""
    if qkv.dim() != 3 or qkv.dtype not in _FLOAT or qkv.shape[-1] % (3 * heads):
        return False
    d = qkv.shape[-1] // (3 * heads)
    return 16 <= d <= 256 and not d & (d - 1)


def _table_ok(table: torch.Tensor, b: int, length: int, d: int) -> bool:
    return (table.dim() == 6 and table.shape[0] in (1, b) and table.shape[1] == 1 and table.shape[2] == length
            and tuple(table.shape[3:]) == (d // 2, 2, 2) and table.dtype == torch.float32)


def applicable(qkvs, weights, table: torch.Tensor, heads: int) -> bool:
    """Whether single_qkv (one qkv) / double_qkv (text, video) takes these inputs as they are, so the
    model can fall back to its PyTorch/compiled group instead of raising: supported dtypes and head_dim,
    one batch/width/dtype/device, [D] weights, an fp32 [B|1, 1, L, D/2, 2, 2] table; and no autograd
    (the kernel has no backward)."""
    first = qkvs[0]
    if not all(supports(x, heads) and x.shape[0] == first.shape[0] and x.shape[2] == first.shape[2]
               and x.dtype == first.dtype and x.device == first.device for x in qkvs):
        return False
    d = first.shape[-1] // (3 * heads)
    if any(w.shape != (d,) or w.device != first.device for w in weights) or table.device != first.device:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*qkvs, *weights, table)):
        return False
    return _table_ok(table, first.shape[0], sum(x.shape[1] for x in qkvs), d)


def _check_table(table: torch.Tensor, b: int, length: int, d: int) -> torch.Tensor:
    if not _table_ok(table, b, length, d):
        raise ValueError(f"RoPE table must be fp32 [B, 1, L={length}, {d // 2}, 2, 2], got {table.dtype} "
                         f"{tuple(table.shape)}")
    if table.stride(-1) != 1 or table.stride(-2) != 2 or table.stride(-3) != 4:
        table = table.contiguous()
    return table


def _launch(streams, heads, table, outs, with_v: bool):
    """streams: [(qkv, wq, wk, row0)], all written into outs = (q, k, v) [B, H, L_out, D]."""
    qo, ko, vo = outs
    b, _, _, d = qo.shape
    block_l = 16 if d <= 128 else 8
    rnd = _round_code(qo.dtype)
    stb = table.stride(0) if table.shape[0] > 1 else 0
    for qkv, wq, wk, row0 in streams:
        q, k, v = _heads(qkv, heads)
        length = q.shape[1]
        if length == 0:
            continue
        _qk_norm_rope_kernel[(triton.cdiv(length, block_l), b)](
            q, k, v, wq.contiguous(), wk.contiguous(), table, qo, ko, vo if with_v else qo, length, row0, heads,
            FP32_EPS, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), stb, table.stride(2), qo.stride(0), qo.stride(1), qo.stride(2),
            HALF=d // 2, BLOCK_L=block_l, HAS_V=with_v, ROUND=rnd, num_warps=4)


def _check_weights(d: int, *ws):
    for w in ws:
        if w.shape != (d,):
            raise ValueError(f"RMSNorm weights must be [{d}], got {tuple(w.shape)}")


def single_qkv(qkv: torch.Tensor, heads: int, wq, wk, table) -> tuple:
    """layers.single_qkv: [B, L, 3*H*D] -> q, k (RMSNorm, RoPE; new [B, H, L, D]) and v (a view)."""
    if not supports(qkv, heads):
        raise ValueError(f"qk_norm_rope takes fp16/bf16/fp32 [B, L, 3*H*D] with a power-of-two head_dim in "
                         f"16..256, got {qkv.dtype} {tuple(qkv.shape)} for {heads} heads")
    b, length, c = qkv.shape
    d = c // (3 * heads)
    _check_weights(d, wq, wk)
    table = _check_table(table, b, length, d)
    qo = torch.empty(b, heads, length, d, dtype=qkv.dtype, device=qkv.device)
    ko = torch.empty_like(qo)
    _launch([(qkv, wq, wk, 0)], heads, table, (qo, ko, None), with_v=False)
    v = _heads(qkv, heads)[2].transpose(1, 2)
    return qo, ko, v


def double_qkv(txt_qkv, img_qkv, heads: int, txt_wq, txt_wk, img_wq, img_wk, table) -> tuple:
    """layers.double_qkv: both streams' q/k RMSNorm + RoPE and the joint [text, video] q, k, v
    ([B, H, Lt + Li, D], new tensors), in one kernel per stream."""
    for x in (txt_qkv, img_qkv):
        if not supports(x, heads):
            raise ValueError(f"qk_norm_rope takes fp16/bf16/fp32 [B, L, 3*H*D] with a power-of-two head_dim in "
                             f"16..256, got {x.dtype} {tuple(x.shape)} for {heads} heads")
    if txt_qkv.shape[0] != img_qkv.shape[0] or txt_qkv.shape[2] != img_qkv.shape[2] or txt_qkv.dtype != img_qkv.dtype:
        raise ValueError(f"text and video qkv must share batch, width and dtype, got {tuple(txt_qkv.shape)} "
                         f"{txt_qkv.dtype} and {tuple(img_qkv.shape)} {img_qkv.dtype}")
    b, lt, c = txt_qkv.shape
    li = img_qkv.shape[1]
    d = c // (3 * heads)
    _check_weights(d, txt_wq, txt_wk, img_wq, img_wk)
    table = _check_table(table, b, lt + li, d)
    qo = torch.empty(b, heads, lt + li, d, dtype=img_qkv.dtype, device=img_qkv.device)
    ko, vo = torch.empty_like(qo), torch.empty_like(qo)
    _launch([(txt_qkv, txt_wq, txt_wk, 0), (img_qkv, img_wq, img_wk, lt)], heads, table, (qo, ko, vo), with_v=True)
    return qo, ko, vo


__all__ = ["single_qkv", "double_qkv", "supports", "applicable"]

"""Wan's q/k RMSNorm (over the whole width) + RoPE in one pass (Triton).

A Wan self-attention normalises q and k over all heads together (norm_q / norm_k are RMSNorm(dim), not
per head as in HunyuanVideo), then rotates each head by RoPE. In ComfyUI that is an RMSNorm kernel and a
RoPE kernel per tensor, each reading and writing the whole [L, dim] activation, and the RoPE one reading
the fp32 [L, D/2, 2, 2] table too. Here one program owns BLOCK_L tokens: it sums their squares over every
head, loads their table rows once, then normalises, rotates and stores head by head, in place if asked
(the linears' outputs are not needed afterwards), in the [B, L, H*D] layout ComfyUI's attention takes.

Math (kernels/wan_qk_norm_rope_ref.py): F.rms_norm's fp32 math with Wan's eps (x * rstd * w rounded once
to the model dtype), then out_j = t[j,0] x_even + t[j,1] x_odd in fp32, rounded to the model dtype. The sum
of squares is accumulated head by head, so the kernel and torch may round rstd differently: outputs can
differ by one unit of the model dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .producer_quant import _round_code
from .qk_norm_rope import _check_table, _table_ok, rope_rows, scaled_rope, token_block

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _wan_qk_kernel(Q, K, WQ, WK, T, QO, KO, L, H, eps, sqb, sql, skb, skl, stb, stl, sob, sol, sokb, sokl,
                   HALF: tl.constexpr, BLOCK_L: tl.constexpr, ROUND: tl.constexpr):
    """Tokens [pid * BLOCK_L, +BLOCK_L) of batch program_id(1): both passes over the H heads of q and k."""
    b, offs_l, l_ok, offs_p, offs_d = token_block(L, HALF, BLOCK_L)
    m = l_ok[:, None]
    in_q = Q + b * sqb + offs_l[:, None] * sql + offs_d[None, :]
    in_k = K + b * skb + offs_l[:, None] * skl + offs_d[None, :]
    ssq = tl.zeros([BLOCK_L], dtype=tl.float32)
    ssk = tl.zeros([BLOCK_L], dtype=tl.float32)
    for h in range(0, H):  # pass 1: the rows' sums of squares over the whole width
        q = tl.load(in_q + h * (2 * HALF), mask=m, other=0.0).to(tl.float32)
        ssq += tl.sum(q * q, axis=1)
        k = tl.load(in_k + h * (2 * HALF), mask=m, other=0.0).to(tl.float32)
        ssk += tl.sum(k * k, axis=1)
    width = H * (2 * HALF)  # an int: H is a constexpr when it is 1 (Triton specialises 1), a runtime int else
    rq = tl.math.rsqrt(ssq / width + eps)
    rk = tl.math.rsqrt(ssk / width + eps)
    t00, t01, t10, t11 = rope_rows(T + b * stb, offs_l, stl, offs_p, m)
    dt = QO.dtype.element_ty
    out_q = QO + b * sob + offs_l[:, None] * sol + offs_d[None, :]
    out_k = KO + b * sokb + offs_l[:, None] * sokl + offs_d[None, :]
    for h in range(0, H):  # pass 2: normalise, rotate, store (a program's rows are its own: in place is safe)
        col = h * (2 * HALF)
        wq0 = tl.load(WQ + col + 2 * offs_p).to(tl.float32)
        wq1 = tl.load(WQ + col + 2 * offs_p + 1).to(tl.float32)
        q = tl.load(in_q + col, mask=m, other=0.0).to(tl.float32)
        tl.store(out_q + col, scaled_rope(q, rq, wq0, wq1, t00, t01, t10, t11, HALF, BLOCK_L, ROUND).to(dt), mask=m)
        wk0 = tl.load(WK + col + 2 * offs_p).to(tl.float32)
        wk1 = tl.load(WK + col + 2 * offs_p + 1).to(tl.float32)
        k = tl.load(in_k + col, mask=m, other=0.0).to(tl.float32)
        tl.store(out_k + col, scaled_rope(k, rk, wk0, wk1, t00, t01, t10, t11, HALF, BLOCK_L, ROUND).to(dt), mask=m)


def supports(q: torch.Tensor, heads: int) -> bool:
    """Whether the kernel takes a [B, L, H*D] activation with these heads (else the caller keeps its
    PyTorch path): a float dtype, unit last stride, a power-of-two head_dim in 16..256."""
    if q.dim() != 3 or q.dtype not in _FLOAT or q.stride(-1) != 1 or q.shape[-1] % heads:
        return False
    d = q.shape[-1] // heads
    return 16 <= d <= 256 and not d & (d - 1)


def applicable(q, k, heads: int, wq, wk, table) -> bool:
    """Whether wan_qk takes these inputs as they are (so a caller can fall back instead of raising): q and k
    alike and supported, [H*D] weights, an fp32 [B|1, 1, L, D/2, 2, 2] table on the same device, no autograd."""
    if not (supports(q, heads) and k.shape == q.shape and k.dtype == q.dtype and k.device == q.device
            and k.stride(-1) == 1):
        return False
    c = q.shape[-1]
    if any(w.shape != (c,) or w.device != q.device for w in (wq, wk)) or table.device != q.device:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, wq, wk, table)):
        return False
    return _table_ok(table, q.shape[0], q.shape[1], c // heads)


def wan_qk(q: torch.Tensor, k: torch.Tensor, heads: int, wq: torch.Tensor, wk: torch.Tensor, table: torch.Tensor,
           eps: float, inplace: bool = False) -> tuple:
    """(RoPE(RMSNorm(q)), RoPE(RMSNorm(k))) for q, k [B, L, H*D] (Wan's norm_q / norm_k weights [H*D], its eps,
    a [B|1, 1, L, D/2, 2, 2] fp32 table), in q's and k's own tensors with inplace, else in new contiguous ones."""
    if not supports(q, heads) or k.shape != q.shape or k.dtype != q.dtype or k.device != q.device \
            or k.stride(-1) != 1:
        raise ValueError(f"wan_qk takes q and k of one fp16/bf16/fp32 [B, L, H*D] shape with a unit last stride and "
                         f"a power-of-two head_dim in 16..256; got {q.dtype} {tuple(q.shape)} and {k.dtype} "
                         f"{tuple(k.shape)} for {heads} heads")
    b, length, c = q.shape
    d = c // heads
    for w in (wq, wk):
        if w.shape != (c,):
            raise ValueError(f"Wan's q/k RMSNorm weights must be [{c}] (the whole width), got {tuple(w.shape)}")
    table = _check_table(table, b, length, d)
    qo = q if inplace else torch.empty(b, length, c, dtype=q.dtype, device=q.device)
    ko = k if inplace else torch.empty_like(qo)
    if length == 0 or b == 0:
        return qo, ko
    block_l = 16 if d <= 128 else 8
    _wan_qk_kernel[(triton.cdiv(length, block_l), b)](
        q, k, wq.contiguous(), wk.contiguous(), table, qo, ko, length, heads, float(eps),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), table.stride(0) if table.shape[0] > 1 else 0,
        table.stride(2), qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1),
        HALF=d // 2, BLOCK_L=block_l, ROUND=_round_code(q.dtype), num_warps=4)
    return qo, ko


__all__ = ["wan_qk", "supports", "applicable"]

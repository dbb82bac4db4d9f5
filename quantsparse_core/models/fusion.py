"""The fused path of the blocks: their small ops grouped for torch.compile, and the groups that end
in the next quantized linear's activation quantization (kernels.producer_quant) or run q/k RMSNorm +
RoPE as one kernel (kernels.qk_norm_rope). Used after HunyuanVideoDiT.fuse_small_ops(); same math
as the blocks' eager forwards (tests/test_fused_small_ops.py)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import dispatch
from ..quant.linear import QuantizedInput
from .attention import AttentionCall
from .layers import apply_rope, modulate, split_heads

# Tokens per chunk of the blocks' post-attention work (0: whole sequence). 32768 keeps the GEMMs large
# (M >= 16k) while the MLP's hidden state at 720p/129f (119k tokens) drops from 2.9 GB to 0.8 GB.
CHUNK_TOKENS_ENV = "QUANTSPARSE_CHUNK_TOKENS"
DEFAULT_CHUNK_TOKENS = 32768


def chunk_tokens() -> int:
    value = os.environ.get(CHUNK_TOKENS_ENV, "").strip()
    if not value:
        return DEFAULT_CHUNK_TOKENS
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{CHUNK_TOKENS_ENV}={value!r} is not a whole number of tokens (0 turns chunking off)")


# ---- small ops, fusable --------------------------------------------------------------------------
# The non-attention, non-GEMM work of a block (layer norm + modulation, q/k RMSNorm + RoPE, gated
# residuals, GELU + concat) costs ~2.6 s of a 720p step when every op runs as its own kernel. These
# functions are the same math grouped so that torch.compile can fuse each group into one or two
# kernels; attention and the linears stay outside them. Blocks use them only after
# HunyuanVideoDiT.fuse_small_ops(); the default (eager) path below is unchanged.

def norm_modulate(x, shift, scale):
    """LayerNorm (no affine, eps 1e-6) then adaLN modulation."""
    return modulate(F.layer_norm(x, x.shape[-1:], eps=1e-6), shift, scale)


def gated_residual(x, y, gate):
    return x + y * gate


def gated_residual_norm_modulate(x, y, gate, shift, scale):
    """x + y * gate, and the next sub-block's modulated LayerNorm of it."""
    x = x + y * gate
    return x, norm_modulate(x, shift, scale)


def _rms(x, weight, dtype):
    return F.rms_norm(x, x.shape[-1:], weight).to(dtype)


def single_qkv(qkv, heads: int, wq, wk, table):
    """[B, L, 3*H*D] -> q, k (RMSNorm, RoPE) and v, each [B, H, L, D]."""
    q, k, v = split_heads(qkv, heads)
    return apply_rope(_rms(q, wq, v.dtype), table), apply_rope(_rms(k, wk, v.dtype), table), v


def double_qkv(txt_qkv, img_qkv, heads: int, txt_wq, txt_wk, img_wq, img_wk, table):
    """Both streams' q/k RMSNorm, the joint [text, video] concat, and RoPE, as one group."""
    tq, tk, tv = split_heads(txt_qkv, heads)
    iq, ik, iv = split_heads(img_qkv, heads)
    q = torch.cat((_rms(tq, txt_wq, tv.dtype), _rms(iq, img_wq, iv.dtype)), dim=2)
    k = torch.cat((_rms(tk, txt_wk, tv.dtype), _rms(ik, img_wk, iv.dtype)), dim=2)
    return apply_rope(q, table), apply_rope(k, table), torch.cat((tv, iv), dim=2)


def concat_gelu(attn_out, hid):
    """The single block's linear2 input: [attention output | GELU-tanh(mlp hidden)]."""
    return torch.cat((attn_out, F.gelu(hid, approximate="tanh")), dim=2)


# ---- the same groups ending in the next linear's activation quantization ----------------------------
# When the consumer is a QuantLinear on the kernel path (QuantLinear.input_quant_spec), the group runs
# as a kernels.producer_quant Triton kernel that emits the consumer's per-token int8 codes + scales
# (QuantLinear's real-mode math: smoothing, clipped absmax, round half to even) instead of bf16, so no
# separate quantization pass reads the activation back. spec = (inv_smooth or None, clip, bits).
# (torch.compile'd versions of these groups measured 1.3-2.0x slower than the bf16 group + act_quant
# on an H100, benchmarks/results/ run 7; benchmarks/gpu_benchmark.py times the kernels.)

def _producers(x):
    return dispatch.producer_quant_kernels(x.device)


def norm_modulate_q(x, shift, scale, inv_smooth, clip, bits: int):
    return _producers(x).norm_modulate_quant(x, shift, scale, inv_smooth, clip, bits)[1:]


def gated_residual_norm_modulate_q(x, y, gate, shift, scale, inv_smooth, clip, bits: int):
    """(x + y * gate, and the codes + scales of its modulated LayerNorm)."""
    return _producers(x).norm_modulate_quant(x, shift, scale, inv_smooth, clip, bits, residual=y, gate=gate)


def gelu_q(hid, inv_smooth, clip, bits: int):
    """The double blocks' MLP activation (GELU-tanh) quantized for fc2."""
    return _producers(hid).gelu_quant(hid, inv_smooth, clip, bits)


def concat_gelu_q(attn_out, hid, inv_smooth, clip, bits: int):
    """[attention output | GELU-tanh(hid)] quantized for the single block's linear2."""
    return _producers(hid).gelu_quant(hid, inv_smooth, clip, bits, prefix=attn_out)


def _spec(linear, x, row_limit: bool = False):
    """The consumer's input quantization (QuantLinear.input_quant_spec), or None for a plain input
    (also when the row is too wide for the one-pass LayerNorm kernel: row_limit)."""
    spec = getattr(linear, "input_quant_spec", None)
    producers = _producers(x)
    if spec is None or producers is None:
        return None
    if row_limit and x.shape[-1] > producers.MAX_ONEPASS_K:
        return None
    return spec(x)


def _single_qkv(ops, qkv, heads: int, wq, wk, table):
    kern = dispatch.qk_norm_rope_kernel([qkv], [wq, wk], table, heads)
    return (kern or ops).single_qkv(qkv, heads, wq, wk, table)


def _double_qkv(ops, txt_qkv, img_qkv, heads: int, txt_wq, txt_wk, img_wq, img_wk, table):
    kern = dispatch.qk_norm_rope_kernel([txt_qkv, img_qkv], [txt_wq, txt_wk, img_wq, img_wk], table, heads)
    return (kern or ops).double_qkv(txt_qkv, img_qkv, heads, txt_wq, txt_wk, img_wq, img_wk, table)


def _as_input(codes_scale, like):
    return QuantizedInput(codes_scale[0], codes_scale[1], tuple(like.shape[:-1]), like.dtype)


class SmallOps:
    """The fusable groups as plain functions (compile=False) or torch.compile'd ones."""

    NAMES = ("norm_modulate", "gated_residual", "gated_residual_norm_modulate", "single_qkv", "double_qkv",
             "concat_gelu")

    def __init__(self, compile: bool = True):
        g = globals()
        for name in self.NAMES:
            fn = g[name]
            if compile:
                # dynamic: one compile serves text, video and joint lengths and every resolution.
                fn = torch.compile(fn, dynamic=True, fullgraph=True)
            setattr(self, name, fn)
        self.compiled = compile


_SMALL_OPS: dict = {}


def small_ops(compile: bool = True) -> SmallOps:
    """One shared SmallOps per mode, so torch.compile runs once per process."""
    if compile not in _SMALL_OPS:
        _SMALL_OPS[compile] = SmallOps(compile)
    return _SMALL_OPS[compile]


def _norm_modulate_for(block, linear, x, shift, scale):
    """The modulated LayerNorm of x as `linear` wants it: bf16, or already quantized for it."""
    ops = block.ops
    spec = _spec(linear, x, row_limit=True) if block.quantize_inputs else None
    if spec is None:
        return ops.norm_modulate(x, shift, scale)
    return _as_input(norm_modulate_q(x, shift, scale, *spec), x)


def _chunks(length: int, size: int):
    """Near-equal token ranges covering [0, length), each at most about `size` (rounded up to a multiple
    of 128 when longer than 128, so the GEMM tiles stay whole); one range when size <= 0 or the sequence
    is shorter."""
    if size <= 0 or length <= size:
        return [(0, length)]
    n = -(-length // size)
    step = -(-length // n)
    if step > 128:
        step = -(-step // 128) * 128
    return [(s, min(length, s + step)) for s in range(0, length, step)]


def _token_slice(h, s: int, e: int):
    """Tokens [s, e) of a [B, L, K] activation, or of a QuantizedInput made from one."""
    if isinstance(h, QuantizedInput):
        b, length = h.lead
        k = h.codes.shape[-1]
        codes = h.codes.view(b, length, k)[:, s:e].reshape(-1, k)
        scale = h.scale.view(b, length, -1)[:, s:e].reshape(-1, 1)
        return QuantizedInput(codes, scale, (b, e - s), h.dtype)
    return h[:, s:e]


def _mlp_tail(block, stream: str, x, y, mod):
    """x + y * gate, then + MLP(norm-modulate(.)) * gate2: the double block's post-attention part for one
    stream, on the tokens it is given."""
    ops = block.ops
    fc1, act, fc2 = getattr(block, f"{stream}_mlp")
    spec = _spec(fc1, x, row_limit=True) if block.quantize_inputs else None
    if spec is None:
        x, h = ops.gated_residual_norm_modulate(x, y, mod[2], mod[3], mod[4])
    else:
        x, *q = gated_residual_norm_modulate_q(x, y, mod[2], mod[3], mod[4], *spec)
        h = _as_input(q, x)
    hid = fc1(h)
    spec = _spec(fc2, hid) if block.quantize_inputs else None
    z = act(hid) if spec is None else _as_input(gelu_q(hid, *spec), hid)
    del hid
    return ops.gated_residual(x, fc2(z), mod[5])


def double_block_fused(block, img, txt, vec, rope, mask, attention_fn, call: AttentionCall):
    """DoubleStreamBlock.forward with the small ops grouped into SmallOps calls (same math). Past
    attention each stream runs in token chunks (chunk_tokens(), exact: every op there is per token), so
    the MLP's 4x-wide hidden state exists for one chunk at a time."""
    ops = block.ops
    # One memory layout for every block (the first block gets the patch embedding's transposed
    # view), so the compiled groups see a single stride pattern and never recompile mid-step.
    img, txt = img.contiguous(), txt.contiguous()
    img_mod, txt_mod = block.img_mod(vec), block.txt_mod(vec)
    ia, ta = block.img_attn, block.txt_attn
    i_qkv = ia.qkv(_norm_modulate_for(block, ia.qkv, img, img_mod[0], img_mod[1]))
    t_qkv = ta.qkv(_norm_modulate_for(block, ta.qkv, txt, txt_mod[0], txt_mod[1]))
    q, k, v = _double_qkv(ops, t_qkv, i_qkv, block.heads, ta.norm.query_norm.weight, ta.norm.key_norm.weight,
                          ia.norm.query_norm.weight, ia.norm.key_norm.weight, rope)
    del i_qkv, t_qkv
    out = attention_fn(q, k, v, mask, call)
    del q, k, v
    n_txt = txt.shape[1]
    streams = []
    for stream, x, o, mod in (("img", img, out[:, n_txt:], img_mod), ("txt", txt, out[:, :n_txt], txt_mod)):
        proj = getattr(block, f"{stream}_attn").proj
        chunks = _chunks(x.shape[1], chunk_tokens())
        if len(chunks) == 1:
            streams.append(_mlp_tail(block, stream, x, proj(o), mod))
            continue
        res = torch.empty_like(x)
        for s, e in chunks:
            res[:, s:e] = _mlp_tail(block, stream, x[:, s:e], proj(o[:, s:e]), mod)
        streams.append(res)
    img, txt = streams
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    return img, txt


def single_block_fused(block, x, vec, rope, mask, attention_fn, call: AttentionCall):
    """SingleStreamBlock.forward with the small ops grouped into SmallOps calls (same math). Where
    linear1 can compute a range of its outputs (QuantLinear.forward_rows) and the sequence is longer
    than chunk_tokens(), only its q/k/v part runs before attention; the MLP part, GELU, linear2 and the
    gated residual run after it, per token chunk, so linear1's 7x-wide output is never held whole."""
    ops = block.ops
    shift, scale, gate = block.modulation(vec)
    h = _norm_modulate_for(block, block.linear1, x, shift, scale)
    n3 = 3 * block.hidden
    rows = getattr(block.linear1, "forward_rows", None)
    chunks = _chunks(x.shape[1], chunk_tokens())
    if rows is None or len(chunks) == 1:
        qkv, hid = block.linear1(h).split([n3, block.mlp_hidden], dim=-1)
    else:
        qkv, hid = rows(h, 0, n3), None
    q, k, v = _single_qkv(ops, qkv, block.heads, block.norm.query_norm.weight, block.norm.key_norm.weight, rope)
    del qkv
    out = attention_fn(q, k, v, mask, call)
    del q, k, v
    if hid is not None:
        x = _single_tail(block, x, out, hid, gate)
    else:
        res = torch.empty_like(x)
        for s, e in chunks:
            hid = rows(_token_slice(h, s, e), n3, n3 + block.mlp_hidden)
            res[:, s:e] = _single_tail(block, x[:, s:e], out[:, s:e], hid, gate)
            del hid
        x = res
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def _single_tail(block, x, out, hid, gate):
    """x + linear2([attention out | GELU(hid)]) * gate on the tokens given."""
    spec = _spec(block.linear2, hid) if block.quantize_inputs else None
    z = block.ops.concat_gelu(out, hid) if spec is None else _as_input(concat_gelu_q(out, hid, *spec), out)
    return block.ops.gated_residual(x, block.linear2(z), gate)

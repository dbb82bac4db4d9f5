"""A Wan attention block in fused form: the same math as WanBlock (and ComfyUI's WanAttentionBlock) with the
small ops grouped and the activation quantization moved into the ops that produce the activations.

- The modulated LayerNorm that q, k and v read is computed once, and quantized once per distinct input
  quantization among them (kernels.producer_quant; a calibrated checkpoint's q/k/v may clip differently,
  an RTN one does not), instead of three act_quant passes over one bf16 tensor.
- q/k RMSNorm over the whole width + RoPE: one kernel, in place (kernels.wan_qk_norm_rope), in the [B, L, H*D]
  layout the attention call takes.
- The FFN (LayerNorm + modulation -> fc1's codes, GELU -> fc2's codes, gated residual) runs in token chunks
  (fusion.chunk_tokens()), so its 2.7x-wide hidden state exists for one chunk at a time.
- Per-frame modulation (Wan 2.2 TI2V's per-frame timesteps) by seeing the tokens as one row per frame.
- Cross-attention runs as the caller gives it (the block's own module: text and, for I2V, image tokens).

`block` is a view (see wan_view for our WanBlock; nodes/fused_wan.py for ComfyUI's) with: ops (fusion.SmallOps),
quantize_inputs, heads, eps, q / k / v / o (linears), wq / wk (the q/k RMSNorm weights), norm3 (module),
fc1 / act / fc2 (the FFN)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from .fusion import _as_input, _chunks, _spec, chunk_tokens, gelu_q, norm_modulate_q
from .layers import apply_rope


def wan_qk_torch(q, k, heads: int, wq, wk, table, eps: float):
    """What kernels.wan_qk_norm_rope computes, in PyTorch ops (F.rms_norm over the width, RoPE per head)."""
    def one(x, w):
        n = F.rms_norm(x, x.shape[-1:], w, eps).unflatten(-1, (heads, -1)).transpose(1, 2)
        return apply_rope(n, table).transpose(1, 2).flatten(2)
    return one(q, wq), one(k, wk)


def wan_qk(q, k, heads: int, wq, wk, table, eps: float):
    """q/k RMSNorm + RoPE, [B, L, H*D] in and out: the kernel in place where it applies, else PyTorch."""
    kern = dispatch.wan_qk_kernel(q, k, heads, wq, wk, table)
    if kern is None:
        return wan_qk_torch(q, k, heads, wq, wk, table, eps)
    return dispatch.guarded("wan_qk_norm_rope", lambda: kern.wan_qk(q, k, heads, wq, wk, table, eps, inplace=True),
                            lambda: wan_qk_torch(q, k, heads, wq, wk, table, eps),
                            "Wan's q/k norm + RoPE runs as PyTorch ops")


def _quantized(ops, x, shift, scale, spec):
    """The modulated LayerNorm of x quantized for a consumer with `spec` (its producer kernel), or None where that
    kernel failed here before (the consumer then quantizes the bf16 activation itself: same codes, one more pass)."""
    return dispatch.guarded("producer_quant (Wan)", lambda: _as_input(norm_modulate_q(x, shift, scale, *spec), x),
                            lambda: None, "Wan blocks quantize each linear's input in the linear")


def _same(a, b) -> bool:
    """Two consumers take the same input: both bf16 (None), or the same quantization (inv_smooth, clip, bits)."""
    if a is None or b is None:
        return a is b
    return a[0] is b[0] and a[1:] == b[1:]


def _modulated_input(block, x, shift, scale, spec):
    """The modulated LayerNorm of x as a consumer with `spec` takes it: quantized by its producer, else bf16."""
    h = None if spec is None else _quantized(block.ops, x, shift, scale, spec)
    return block.ops.norm_modulate(x, shift, scale) if h is None else h


def _qkv(block, x, shift, scale):
    """The q, k, v linears' outputs on the modulated LayerNorm of x, made once per distinct input (a calibrated
    checkpoint's q/k/v may clip differently, an RTN one does not), each dropped after its last consumer."""
    linears = (block.q, block.k, block.v)
    specs = [_spec(lin, x, row_limit=True) if block.quantize_inputs else None for lin in linears]
    owner = [next(j for j in range(i + 1) if _same(specs[j], specs[i])) for i in range(3)]
    last = {j: max(i for i in range(3) if owner[i] == j) for j in set(owner)}
    made, outs = {}, []
    for i, linear in enumerate(linears):
        j = owner[i]
        if j not in made:
            made[j] = _modulated_input(block, x, shift, scale, specs[j])
        outs.append(linear(made[j]))
        if last[j] == i:
            del made[j]
    return outs


def _ffn_tail(block, x, shift, scale, gate):
    """x + FFN(norm-modulate(x)) * gate on the tokens given."""
    spec = _spec(block.fc1, x, row_limit=True) if block.quantize_inputs else None
    hid = block.fc1(_modulated_input(block, x, shift, scale, spec))
    spec = _spec(block.fc2, hid) if block.quantize_inputs else None
    z = block.act(hid) if spec is None else _as_input(gelu_q(hid, *spec), hid)
    del hid
    return torch.addcmul(x, block.fc2(z), gate)  # one rounding, as ComfyUI's block


def wan_block_fused(block, x, mods, table, cross, attention):
    """One Wan block. x [B, L, C]; mods: (shift1, scale1, gate1, shift2, scale2, gate2), each [B, R, C] in x's dtype
    (the block's table plus the time projection; R = 1, or one row per latent frame as Wan 2.2 TI2V's per-frame
    timesteps give, L a multiple of R); table: RoPE [B|1, 1, L, D/2, 2, 2] fp32; cross(h) -> the cross-attention's
    output (after its o) for the norm3'd stream h [B, L, C]; attention(q, k, v) on [B, L, H*D] tensors ->
    [B, L, H*D]. The per-token work runs on x seen as [B*R, L/R, C], so a frame's modulation row [B*R, 1, C]
    broadcasts over its tokens (and the producers index it per row as they index a batch's)."""
    b, length, c = x.shape
    rows = mods[0].shape[1]
    if length % rows:
        raise ValueError(f"{rows} modulation rows (frames) do not split {length} tokens evenly")
    framed = (b * rows, length // rows, c)
    shift1, scale1, gate1, shift2, scale2, gate2 = (m.reshape(b * rows, 1, c) for m in mods)
    x = x.contiguous()  # one layout for every block: the compiled groups never recompile mid-step
    q, k, v = (t.reshape(b, length, -1) for t in _qkv(block, x.view(framed), shift1, scale1))
    q, k = wan_qk(q, k, block.heads, block.wq, block.wk, table, block.eps)
    out = attention(q, k, v)
    del q, k, v
    x = torch.addcmul(x.view(framed), block.o(out).reshape(framed), gate1).view(b, length, c)
    del out
    x = (x + cross(block.norm3(x))).view(framed)
    return _ffn(block, x, shift2, scale2, gate2).view(b, length, c)


def _ffn(block, x, shift, scale, gate):
    """_ffn_tail over x [N, T, C] (N = batch x frames, each row with its modulation [N, 1, C]) in pieces of about
    chunk_tokens() tokens a row: long rows (one timestep: T = all tokens) in token chunks across every row, as
    HunyuanVideo's blocks; short ones (a frame each) whole, as many together as fit a chunk."""
    n, t, _ = x.shape
    size = chunk_tokens()
    if size <= 0 or n * t <= size:
        return _ffn_tail(block, x, shift, scale, gate)
    res = torch.empty_like(x)
    if t > size:
        for s, e in _chunks(t, size):
            res[:, s:e] = _ffn_tail(block, x[:, s:e], shift, scale, gate)
        return res
    per = max(1, size // t)
    for i in range(0, n, per):
        j = min(n, i + per)
        res[i:j] = _ffn_tail(block, x[i:j], shift[i:j], scale[i:j], gate[i:j])
    return res


class _View:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def wan_view(block, ops, quantize_inputs: bool = True):
    """Our WanBlock (models/wan.py) as wan_block_fused takes it."""
    sa = block.self_attn
    fc1, act, fc2 = block.ffn
    return _View(ops=ops, quantize_inputs=quantize_inputs, heads=sa.heads, eps=sa.norm_q.eps, q=sa.q, k=sa.k,
                 v=sa.v, o=sa.o, wq=sa.norm_q.weight, wk=sa.norm_k.weight, norm3=block.norm3, fc1=fc1, act=act,
                 fc2=fc2)

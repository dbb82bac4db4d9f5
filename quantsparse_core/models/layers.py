"""Building blocks of the HunyuanVideo DiT, written to match ComfyUI's math and key names."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernel_link import kernel_module
from ..quant.linear import QuantizedInput
from .attention import AttentionCall


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0,
                       time_factor: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of `time_factor * t`, frequencies max_period^(-i/half)."""
    t = t * time_factor
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope_table(pos: torch.Tensor, axes: tuple, theta: float) -> torch.Tensor:
    """Rotation coefficients for 3-D positions `pos` [B, L, 3] -> [B, 1, L, head_dim/2, 2, 2] (fp32).

    Each axis a gets axes[a] channels (axes[a]/2 rotated pairs) with frequencies
    theta^(-2i/axes[a]); text tokens sit at position 0 (identity rotation).
    """
    mats = []
    for a, dim in enumerate(axes):
        exponent = torch.linspace(0, (dim - 2) / dim, dim // 2, dtype=torch.float64)
        omega = (1.0 / theta ** exponent).to(torch.float32).to(pos.device)
        ang = pos[..., a].to(torch.float32)[..., None] * omega          # [B, L, dim/2]
        cos, sin = torch.cos(ang), torch.sin(ang)
        mats.append(torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)))
    return torch.cat(mats, dim=-3).unsqueeze(1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, H, L, D] by `table` (from rope_table)."""
    pairs = x.to(table.dtype).unflatten(-1, (-1, 1, 2))                  # [B, H, L, D/2, 1, 2]
    out = table[..., 0] * pairs[..., 0] + table[..., 1] * pairs[..., 1]  # [B, H, L, D/2, 2]
    return out.flatten(-2).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden, device=None, dtype=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden, device=device, dtype=dtype)
        self.out_layer = nn.Linear(hidden, hidden, device=device, dtype=dtype)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """adaLN: vec -> (shift, scale, gate) once (single) or twice (double), each [B, 1, C]."""

    def __init__(self, hidden, count, device=None, dtype=None):
        super().__init__()
        self.count = count
        self.lin = nn.Linear(hidden, count * hidden, device=device, dtype=dtype)

    def forward(self, vec):
        return self.lin(F.silu(vec[:, None, :])).chunk(self.count, dim=-1)


class QKNorm(nn.Module):
    def __init__(self, head_dim, device=None, dtype=None):
        super().__init__()
        self.query_norm = nn.RMSNorm(head_dim, eps=None, device=device, dtype=dtype)
        self.key_norm = nn.RMSNorm(head_dim, eps=None, device=device, dtype=dtype)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class QKVAttention(nn.Module):
    """Weights of one stream's attention: fused qkv, per-head q/k RMSNorm, output projection."""

    def __init__(self, hidden, head_dim, device=None, dtype=None):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden, device=device, dtype=dtype)
        self.norm = QKNorm(head_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden, hidden, device=device, dtype=dtype)


def mlp(hidden, inner, act: nn.Module, device=None, dtype=None) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, inner, device=device, dtype=dtype), act,
                         nn.Linear(inner, hidden, device=device, dtype=dtype))


def modulate(x, shift, scale):
    return torch.addcmul(shift, x, 1 + scale)


def split_heads(qkv: torch.Tensor, heads: int):
    """[B, L, 3*H*D] -> three [B, H, L, D]."""
    b, l, _ = qkv.shape
    return qkv.view(b, l, 3, heads, -1).permute(2, 0, 3, 1, 4)


def _no_affine_ln(hidden, device, dtype):
    return nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6, device=device, dtype=dtype)


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
# on an H100, docs/BENCHMARKS.md; benchmarks/gpu_benchmark.py times the kernels.)

def _producers():
    return kernel_module("producer_quant")


def norm_modulate_q(x, shift, scale, inv_smooth, clip, bits: int):
    return _producers().norm_modulate_quant(x, shift, scale, inv_smooth, clip, bits)[1:]


def gated_residual_norm_modulate_q(x, y, gate, shift, scale, inv_smooth, clip, bits: int):
    """(x + y * gate, and the codes + scales of its modulated LayerNorm)."""
    return _producers().norm_modulate_quant(x, shift, scale, inv_smooth, clip, bits, residual=y, gate=gate)


def gelu_q(hid, inv_smooth, clip, bits: int):
    """The double blocks' MLP activation (GELU-tanh) quantized for fc2."""
    return _producers().gelu_quant(hid, inv_smooth, clip, bits)


def concat_gelu_q(attn_out, hid, inv_smooth, clip, bits: int):
    """[attention output | GELU-tanh(hid)] quantized for the single block's linear2."""
    return _producers().gelu_quant(hid, inv_smooth, clip, bits, prefix=attn_out)


def _spec(linear, x, row_limit: bool = False):
    """The consumer's input quantization (QuantLinear.input_quant_spec), or None for a plain input
    (also when the row is too wide for the one-pass LayerNorm kernel: row_limit)."""
    spec = getattr(linear, "input_quant_spec", None)
    if spec is None or _producers() is None:
        return None
    if row_limit and x.shape[-1] > _producers().MAX_ONEPASS_K:
        return None
    return spec(x)


def _qk_kernels(qkvs, weights, table, heads: int):
    """kernels.qk_norm_rope where the Triton path applies to these inputs (kernels.dispatch, and the
    kernel takes them as they are), else None: the q/k RMSNorm + RoPE group then runs as one kernel
    that reads the RoPE table once per token (the compiled group re-read it for every head: ~5x its
    traffic at 720p)."""
    module, dispatch = kernel_module("qk_norm_rope"), kernel_module("dispatch")
    if module is None or dispatch is None or not dispatch.use_triton(qkvs[0].device):
        return None
    return module if module.applicable(qkvs, weights, table, heads) else None


def _single_qkv(ops, qkv, heads: int, wq, wk, table):
    kern = _qk_kernels([qkv], [wq, wk], table, heads)
    return (kern or ops).single_qkv(qkv, heads, wq, wk, table)


def _double_qkv(ops, txt_qkv, img_qkv, heads: int, txt_wq, txt_wk, img_wq, img_wk, table):
    kern = _qk_kernels([txt_qkv, img_qkv], [txt_wq, txt_wk, img_wq, img_wk], table, heads)
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


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and video tokens, one joint attention over [text, video]."""

    def __init__(self, hidden, heads, mlp_hidden, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        kw = dict(device=device, dtype=dtype)
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, 6, **kw))
            setattr(self, f"{s}_norm1", _no_affine_ln(hidden, **kw))
            setattr(self, f"{s}_attn", QKVAttention(hidden, hidden // heads, **kw))
            setattr(self, f"{s}_norm2", _no_affine_ln(hidden, **kw))
            setattr(self, f"{s}_mlp", mlp(hidden, mlp_hidden, nn.GELU(approximate="tanh"), **kw))
        self.ops = None  # SmallOps after HunyuanVideoDiT.fuse_small_ops(); None = eager
        self.quantize_inputs = False  # fused path: groups quantize for the next QuantLinear (fuse_small_ops)

    def _qkv(self, stream, x, shift, scale):
        attn = getattr(self, f"{stream}_attn")
        q, k, v = split_heads(attn.qkv(modulate(getattr(self, f"{stream}_norm1")(x), shift, scale)), self.heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, stream, x, attn_out, mod):
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + getattr(self, f"{stream}_attn").proj(attn_out) * gate1
        h = modulate(getattr(self, f"{stream}_norm2")(x), shift2, scale2)
        return x + getattr(self, f"{stream}_mlp")(h) * gate2

    def forward(self, img, txt, vec, rope, mask, attention_fn, call: AttentionCall):
        if self.ops is not None:
            return self._forward_fused(img, txt, vec, rope, mask, attention_fn, call)
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", img, img_mod[0], img_mod[1])
        tq, tk, tv = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        q, k, v = (torch.cat(p, dim=2) for p in ((tq, iq), (tk, ik), (tv, iv)))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention_fn(q, k, v, mask, call)
        n_txt = txt.shape[1]
        img = self._finish("img", img, out[:, n_txt:], img_mod)
        txt = self._finish("txt", txt, out[:, :n_txt], txt_mod)
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt

    def _forward_fused(self, img, txt, vec, rope, mask, attention_fn, call: AttentionCall):
        """forward() with the small ops grouped into SmallOps calls (same math)."""
        ops = self.ops
        # One memory layout for every block (the first block gets the patch embedding's transposed
        # view), so the compiled groups see a single stride pattern and never recompile mid-step.
        img, txt = img.contiguous(), txt.contiguous()
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        ia, ta = self.img_attn, self.txt_attn
        i_qkv = ia.qkv(_norm_modulate_for(self, ia.qkv, img, img_mod[0], img_mod[1]))
        t_qkv = ta.qkv(_norm_modulate_for(self, ta.qkv, txt, txt_mod[0], txt_mod[1]))
        q, k, v = _double_qkv(ops, t_qkv, i_qkv, self.heads, ta.norm.query_norm.weight, ta.norm.key_norm.weight,
                              ia.norm.query_norm.weight, ia.norm.key_norm.weight, rope)
        out = attention_fn(q, k, v, mask, call)
        n_txt = txt.shape[1]
        streams = []
        for stream, x, o, mod in (("img", img, out[:, n_txt:], img_mod), ("txt", txt, out[:, :n_txt], txt_mod)):
            fc1, act, fc2 = getattr(self, f"{stream}_mlp")
            y = getattr(self, f"{stream}_attn").proj(o)
            spec = _spec(fc1, x, row_limit=True) if self.quantize_inputs else None
            if spec is None:
                x, h = ops.gated_residual_norm_modulate(x, y, mod[2], mod[3], mod[4])
            else:
                x, *q = gated_residual_norm_modulate_q(x, y, mod[2], mod[3], mod[4], *spec)
                h = _as_input(q, x)
            hid = fc1(h)
            spec = _spec(fc2, hid) if self.quantize_inputs else None
            z = act(hid) if spec is None else _as_input(gelu_q(hid, *spec), hid)
            streams.append(ops.gated_residual(x, fc2(z), mod[5]))
        img, txt = streams
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Shared weights over the joint sequence; attention and MLP run in parallel from one linear."""

    def __init__(self, hidden, heads, mlp_hidden, device=None, dtype=None):
        super().__init__()
        self.heads, self.hidden, self.mlp_hidden = heads, hidden, mlp_hidden
        kw = dict(device=device, dtype=dtype)
        self.linear1 = nn.Linear(hidden, 3 * hidden + mlp_hidden, **kw)
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden, **kw)
        self.norm = QKNorm(hidden // heads, **kw)
        self.pre_norm = _no_affine_ln(hidden, **kw)
        self.modulation = Modulation(hidden, 3, **kw)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.ops = None  # SmallOps after HunyuanVideoDiT.fuse_small_ops(); None = eager
        self.quantize_inputs = False  # fused path: groups quantize for the next QuantLinear (fuse_small_ops)

    def forward(self, x, vec, rope, mask, attention_fn, call: AttentionCall):
        if self.ops is not None:
            return self._forward_fused(x, vec, rope, mask, attention_fn, call)
        shift, scale, gate = self.modulation(vec)
        qkv, hid = self.linear1(modulate(self.pre_norm(x), shift, scale)).split(
            [3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = split_heads(qkv, self.heads)
        q, k = self.norm(q, k, v)
        out = attention_fn(apply_rope(q, rope), apply_rope(k, rope), v, mask, call)
        x = x + self.linear2(torch.cat((out, self.mlp_act(hid)), dim=2)) * gate
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x

    def _forward_fused(self, x, vec, rope, mask, attention_fn, call: AttentionCall):
        """forward() with the small ops grouped into SmallOps calls (same math)."""
        ops = self.ops
        shift, scale, gate = self.modulation(vec)
        h = _norm_modulate_for(self, self.linear1, x, shift, scale)
        qkv, hid = self.linear1(h).split([3 * self.hidden, self.mlp_hidden], dim=-1)
        q, k, v = _single_qkv(ops, qkv, self.heads, self.norm.query_norm.weight, self.norm.key_norm.weight, rope)
        out = attention_fn(q, k, v, mask, call)
        spec = _spec(self.linear2, hid) if self.quantize_inputs else None
        z = ops.concat_gelu(out, hid) if spec is None else _as_input(concat_gelu_q(out, hid, *spec), out)
        x = ops.gated_residual(x, self.linear2(z), gate)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return x


class RefinerBlock(nn.Module):
    """Token refiner block: plain self-attention over text tokens with gated residuals."""

    def __init__(self, hidden, heads, device=None, dtype=None):
        super().__init__()
        self.heads = heads
        kw = dict(device=device, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, **kw))
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, **kw)
        self.self_attn = nn.Module()
        self.self_attn.qkv = nn.Linear(hidden, 3 * hidden, **kw)
        self.self_attn.proj = nn.Linear(hidden, hidden, **kw)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, **kw)
        self.mlp = mlp(hidden, 4 * hidden, nn.SiLU(), **kw)

    def forward(self, x, c, mask, attention_fn, call: AttentionCall):
        gate1, gate2 = self.adaLN_modulation(c).chunk(2, dim=1)
        q, k, v = split_heads(self.self_attn.qkv(self.norm1(x)), self.heads)
        x = x + self.self_attn.proj(attention_fn(q, k, v, mask, call)) * gate1.unsqueeze(1)
        return x + self.mlp(self.norm2(x)) * gate2.unsqueeze(1)


class TokenRefiner(nn.Module):
    def __init__(self, text_dim, hidden, heads, num_blocks, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.input_embedder = nn.Linear(text_dim, hidden, **kw)
        self.t_embedder = MLPEmbedder(256, hidden, **kw)
        self.c_embedder = MLPEmbedder(text_dim, hidden, **kw)
        self.individual_token_refiner = nn.Module()
        self.individual_token_refiner.blocks = nn.ModuleList(
            RefinerBlock(hidden, heads, **kw) for _ in range(num_blocks))

    def forward(self, txt, timesteps, txt_mask, attention_fn, call_for):
        t = self.t_embedder(timestep_embedding(timesteps).to(txt.dtype))
        # Pooled over all positions, padding included (as ComfyUI does).
        pooled = txt.float().mean(dim=1) if txt.dtype == torch.float16 else txt.sum(dim=1) / txt.shape[1]
        c = t + self.c_embedder(pooled.to(txt.dtype))
        x = self.input_embedder(txt)
        mask = None
        if txt_mask is not None:
            m = txt_mask.view(txt_mask.shape[0], 1, 1, -1).expand(-1, 1, txt_mask.shape[1], -1)
            mask = m + m.transpose(2, 3)
        blocks = self.individual_token_refiner.blocks
        for i, block in enumerate(blocks):
            x = block(x, c, mask, attention_fn, call_for("refiner", i, len(blocks)))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden, patch_numel, out_channels, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm_final = _no_affine_ln(hidden, **kw)
        self.linear = nn.Linear(hidden, patch_numel * out_channels, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, **kw))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

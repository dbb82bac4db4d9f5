"""The HunyuanVideo DiT's blocks, one forward each (ComfyUI's math and key names): double-stream and
single-stream joint blocks, the token refiner, the final layer. After HunyuanVideoDiT.fuse_small_ops()
the joint blocks run their fused form (fusion.py) instead, with the same math."""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionCall
from .fusion import double_block_fused, single_block_fused
from .layers import (MLPEmbedder, Modulation, QKNorm, QKVAttention, _no_affine_ln, apply_rope, mlp, modulate, split_heads,
                     timestep_embedding)

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
            return double_block_fused(self, img, txt, vec, rope, mask, attention_fn, call)
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
            return single_block_fused(self, x, vec, rope, mask, attention_fn, call)
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

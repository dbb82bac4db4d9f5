"""kernels.wan_qk_norm_rope (Wan's whole-width q/k RMSNorm + RoPE) against its PyTorch reference, and the
reference against our Wan model's self-attention math (F.rms_norm + apply_rope). CPU interpreter at small,
odd shapes; tests/test_kernels_cuda.py repeats it at Wan2.1-14B's width."""
import pytest
import torch

from quantsparse_kernels import wan_qk_norm_rope as kern
from quantsparse_kernels.wan_qk_norm_rope_ref import wan_qk_ref
from quantsparse_core.models.layers import apply_rope
from quantsparse_core.models.wan import split_heads, wan_rope
from test_kernel_qk_norm_rope import close
from kernel_marks import interpreted

EPS = 1e-6


def make(rng, b, grid, heads, d, dtype, pad=8):
    """q, k [B, L, H*D] (strided rows, as views of wider buffers), [H*D] weights, Wan's RoPE table."""
    length = grid[0] * grid[1] * grid[2]
    c = heads * d
    q, k = ((torch.randn(b, length, c + pad, generator=rng) * 3).to(dtype)[..., pad:] for _ in range(2))
    wq, wk = ((torch.rand(c, generator=rng) + 0.5).to(dtype) for _ in range(2))
    axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    return q, k, wq, wk, wan_rope(grid, axes, 10000.0, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_wan_qk_matches_reference(rng, dtype):
    q, k, wq, wk, table = make(rng, 2, (3, 3, 5), 3, 64, dtype)   # 45 tokens: a partial token block
    ref = wan_qk_ref(q, k, 3, wq, wk, table, EPS)
    close(kern.wan_qk(q, k, 3, wq, wk, table, EPS), ref, dtype)
    qi, ki = q.clone(), k.clone()
    out = kern.wan_qk(qi, ki, 3, wq, wk, table, EPS, inplace=True)
    assert out[0] is qi and out[1] is ki
    close(out, ref, dtype)


def test_reference_equals_the_models_math(rng):
    """The reference is our WanSelfAttention's norm + RoPE (F.rms_norm over the width, apply_rope per head),
    bit for bit in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, wq, wk, table = make(rng, 1, (2, 2, 3), 2, 32, dtype)
        for x, w, r in zip((q, k), (wq, wk), wan_qk_ref(q, k, 2, wq, wk, table, EPS)):
            model = apply_rope(split_heads(torch.nn.functional.rms_norm(x, x.shape[-1:], w, EPS), 2), table)
            torch.testing.assert_close(model.transpose(1, 2).flatten(2), r, rtol=0, atol=0)


def test_bad_input_gets_clear_errors(rng):
    q, k, wq, wk, table = make(rng, 1, (2, 2, 2), 2, 32, torch.float32)
    assert not kern.supports(torch.randn(1, 4, 2 * 24), 2)                  # head_dim 24
    assert not kern.applicable(q, k, 2, wq[:32], wk, table)                  # per-head weight, not the width
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        kern.wan_qk(torch.randn(1, 8, 48), torch.randn(1, 8, 48), 2, wq[:48], wk[:48], table, EPS)
    with pytest.raises(ValueError, match="whole width"):
        kern.wan_qk(q, k, 2, wq[:32], wk, table, EPS)
    with pytest.raises(ValueError, match="RoPE table must be"):
        kern.wan_qk(q[:, :5], k[:, :5], 2, wq, wk, table, EPS)               # table for 8 tokens

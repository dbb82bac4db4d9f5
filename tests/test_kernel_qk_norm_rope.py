"""kernels.qk_norm_rope (q/k RMSNorm + RoPE + joint layout, one pass) against its PyTorch reference,
the reference against the model's own grouped ops, and the fused model with the kernel against the
eager model. CPU interpreter at small, odd shapes; tests/test_kernels_cuda.py repeats it at full size."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_kernels import qk_norm_rope as kern
from quantsparse_kernels.qk_norm_rope_ref import double_qkv_ref, single_qkv_ref
from quantsparse_core.models import HunyuanVideoDiT, fusion, get_preset, layers
from test_fused_small_ops import randomize
from test_model import small_inputs
from kernel_marks import interpreted

THETA = 256.0


def make(rng, b, lengths, heads, d, dtype, pad=8):
    """qkv per stream ([B, L, 3 H D] strided views, as linear1's split gives), 4 weights, RoPE table."""
    qkvs = [(torch.randn(b, n, 3 * heads * d + pad, generator=rng) * 3).to(dtype)[..., pad:] for n in lengths]
    ws = [(torch.rand(d, generator=rng) + 0.5).to(dtype) for _ in range(4)]
    pos = torch.randint(0, 40, (b, sum(lengths), 3), generator=rng).float()
    pos[:, :lengths[0] // 2] = 0  # text-like rows at position 0 (identity rotation)
    axes = (d // 4, 3 * d // 8, 3 * d // 8)  # channels per position axis (HunyuanVideo: 16 / 56 / 56 of 128)
    return qkvs, ws, layers.rope_table(pos, axes, THETA)


def unit_bound(ref: torch.Tensor, dtype) -> torch.Tensor:
    """One unit in the last place of |ref| plus of its rotated pair's norm: the output is a rotation of
    two once-rounded normalised values, so a rounding flip in either moves it by up to one unit of
    the pair's magnitude (which the rotation preserves), even where the output itself is near zero."""
    r = ref.float()
    pair = r.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*r.shape[:-1], r.shape[-1] // 2, 2)
    return torch.finfo(dtype).eps * (r.abs() + pair.flatten(-2))


def close(got, ref, dtype):
    """fp32: within 2e-6 relative; 16-bit: within unit_bound, on <= 1e-3 of entries."""
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype
        assert bool(torch.isfinite(g).all()) and float(r.abs().mean()) > 0.1
        if dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=2e-6, atol=2e-6)
        else:
            off = (g.float() - r.float()).abs()
            assert bool((off <= unit_bound(r, dtype)).all()), float((off / unit_bound(r, dtype)).max())
            assert float((off > 0).float().mean()) <= 1e-3


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_single_and_double_qkv_match_reference(rng, dtype):
    b, heads, d = 2, 3, 64
    (tq, iq), ws, table = make(rng, b, (5, 37), heads, d, dtype)   # partial token blocks
    close(kern.double_qkv(tq, iq, heads, *ws, table), double_qkv_ref(tq, iq, heads, *ws, table), dtype)
    single_table = table[:, :, :37]
    got = kern.single_qkv(iq, heads, ws[0], ws[1], single_table)
    ref = single_qkv_ref(iq, heads, ws[0], ws[1], single_table)
    close(got[:2], ref[:2], dtype)
    assert torch.equal(got[2], ref[2])  # v: the same view of qkv


def test_reference_equals_the_models_grouped_ops(rng):
    """The reference computes what the model's (uncompiled) groups do, bit for bit, in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        (tq, iq), ws, table = make(rng, 1, (4, 30), 2, 32, dtype)
        for a, r in zip(fusion.double_qkv(tq, iq, 2, *ws, table), double_qkv_ref(tq, iq, 2, *ws, table)):
            torch.testing.assert_close(a, r, rtol=0, atol=0)
        for a, r in zip(fusion.single_qkv(iq, 2, ws[0], ws[1], table[:, :, 4:]),
                        single_qkv_ref(iq, 2, ws[0], ws[1], table[:, :, 4:])):
            torch.testing.assert_close(a, r, rtol=0, atol=0)


@interpreted
def test_fused_model_with_the_kernel_equals_eager(rng):
    """fuse_small_ops(compile=False) with the Triton path forced (interpreter): the blocks take
    qk_norm_rope, and the model output equals the eager model's."""
    cfg = get_preset("test")
    model = randomize(HunyuanVideoDiT(cfg), rng).eval()
    x, ctx, y, mask = small_inputs(cfg, rng)
    args = (x, torch.tensor([640.0]), ctx, y, torch.tensor([6.0]))
    calls = []
    original = kern._launch

    def counting(*a, **k):
        calls.append(1)
        return original(*a, **k)

    with torch.no_grad():
        eager = model(*args, attention_mask=mask)
        model.fuse_small_ops(compile=False)
        kern._launch = counting
        try:
            with dispatch.forced("triton"):
                fused = model(*args, attention_mask=mask)
        finally:
            kern._launch = original
            model.fuse_small_ops(False)
    assert len(calls) == len(model.double_blocks) + len(model.single_blocks)
    torch.testing.assert_close(fused, eager, atol=2e-5, rtol=2e-5)


def test_bad_input_gets_clear_errors(rng):
    (tq, iq), ws, table = make(rng, 1, (4, 10), 2, 32, torch.float32)
    assert not kern.supports(torch.randn(1, 4, 3 * 2 * 24), 2)          # head_dim 24: not a power of two
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        kern.single_qkv(torch.randn(1, 4, 3 * 2 * 24), 2, ws[0][:24], ws[1][:24], table)
    with pytest.raises(ValueError, match="RoPE table must be"):
        kern.single_qkv(iq, 2, ws[0], ws[1], table)                     # table for 14 tokens, qkv has 10
    with pytest.raises(ValueError, match="RMSNorm weights"):
        kern.single_qkv(iq, 2, ws[0][:16], ws[1], table[:, :, :10])
    with pytest.raises(ValueError, match="share batch"):
        kern.double_qkv(tq, iq.to(torch.float16), 2, *ws, table)


def test_applicable_sends_other_inputs_to_the_fallback(rng):
    """The model asks `applicable` before taking the kernel: inputs the PyTorch group accepts but the
    kernel does not (mixed dtypes, a 16-bit or per-head table, autograd) go to the fallback, not an error."""
    (tq, iq), ws, table = make(rng, 1, (4, 10), 2, 32, torch.float32)
    assert kern.applicable([tq, iq], ws, table, 2) and kern.applicable([iq], ws[:2], table[:, :, 4:], 2)
    assert not kern.applicable([tq, iq.double()], ws, table, 2)
    assert not kern.applicable([tq, iq], ws, table.half(), 2)
    assert not kern.applicable([tq, iq], ws, table.expand(1, 2, -1, -1, -1, -1), 2)
    assert not kern.applicable([tq, iq], [ws[0][:16]] + ws[1:], table, 2)
    assert not kern.applicable([iq], ws[:2], table, 2)            # table for 14 tokens, qkv has 10
    grad_w = ws[0].clone().requires_grad_()
    assert not kern.applicable([tq, iq], [grad_w] + ws[1:], table, 2)
    with torch.no_grad():
        assert kern.applicable([tq, iq], [grad_w] + ws[1:], table, 2)

"""kernels.producer_quant (an activation's producing op + its per-token quantization, one pass) against
its PyTorch reference, and the reference against the model's own unfused ops + act_quant_ref. CPU
interpreter at small shapes; tests/test_kernels_cuda.py repeats it at full size on a GPU."""
import pytest
import torch
import torch.nn.functional as F

from quantsparse_kernels.act_quant_ref import act_quant_ref
from quantsparse_kernels.producer_quant import gelu_quant, norm_modulate_quant
from quantsparse_kernels.producer_quant_ref import gelu_quant_ref, norm_modulate_quant_ref
from quantsparse_core.models import blocks, fusion, layers
from kernel_marks import interpreted


def agree(got, ref, frac):
    """codes: at most one step apart, on at most `frac` of the entries; scales within 1e-5."""
    d = (got[0].int() - ref[0].int()).abs()
    assert got[0].dtype == torch.int8 and got[0].shape == ref[0].shape
    assert (got[0] != 0).float().mean() > 0.3  # not a trivial all-zero output
    assert d.max() <= 1 and (d > 0).float().mean() <= frac, (int(d.max()), float((d > 0).float().mean()))
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=0)


def _smooth(rng, k):
    return torch.rand(k, generator=rng) + 0.5


@interpreted
@pytest.mark.parametrize("dtype,frac", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bits,config", [(8, None), (6, None), (8, dict(ROWS=4, num_warps=2))])
def test_norm_modulate_quant(rng, dtype, frac, bits, config):
    b, l, c = 2, 37, 200                                   # odd sizes: partial row tiles and columns
    x, y = ((torch.randn(b, l, c, generator=rng) * 3 + 1).to(dtype) for _ in range(2))
    shift, scale, gate = ((torch.randn(b, 1, c, generator=rng) * 0.5).to(dtype) for _ in range(3))
    inv = _smooth(rng, c)
    for smooth, clip in ((None, 1.0), (inv, 0.85)):
        xo, *got = norm_modulate_quant(x, shift, scale, smooth, clip, bits, config=config)
        assert xo is None
        agree(got, norm_modulate_quant_ref(x, shift, scale, smooth, clip, bits)[1:], frac)
        xo, *got = norm_modulate_quant(x, shift, scale, smooth, clip, bits, residual=y, gate=gate, config=config)
        xr, *ref = norm_modulate_quant_ref(x, shift, scale, smooth, clip, bits, residual=y, gate=gate)
        torch.testing.assert_close(xo, xr, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)
        agree(got, ref, frac)


@interpreted
def test_norm_modulate_quant_at_wan14b_width(rng):
    """Wan2.1-14B's 5120 channels: the one-row, 8192-column default launch, with the gated residual."""
    b, l, c = 1, 3, 5120
    x, y = ((torch.randn(b, l, c, generator=rng) * 3 + 1).to(torch.bfloat16) for _ in range(2))
    shift, scale, gate = ((torch.randn(b, 1, c, generator=rng) * 0.5).to(torch.bfloat16) for _ in range(3))
    xo, *got = norm_modulate_quant(x, shift, scale, None, 0.9, 8, residual=y, gate=gate)
    xr, *ref = norm_modulate_quant_ref(x, shift, scale, None, 0.9, 8, residual=y, gate=gate)
    torch.testing.assert_close(xo, xr, rtol=1e-2, atol=1e-5)
    agree(got, ref, 2e-2)


@interpreted
@pytest.mark.parametrize("dtype,frac", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("config", [None, dict(ROWS=4, CHUNK=512)], ids=["default", "4 rows x 512"])
def test_gelu_quant_with_and_without_prefix(rng, dtype, frac, config):
    m, ka, kb = 9, 96, 2500                                # several CHUNK pieces, a partial last one
    hid = (torch.randn(3, m, kb + 7, generator=rng) * 3).to(dtype)[..., 7:]   # strided view, as split() gives
    pre = torch.randn(3, m, ka, generator=rng).to(dtype)
    for bits in (8, 6):
        agree(gelu_quant(hid, None, 1.0, bits, config=config), gelu_quant_ref(hid, None, 1.0, bits), frac)
        inv = _smooth(rng, ka + kb)
        agree(gelu_quant(hid, inv, 0.9, bits, prefix=pre, config=config),
              gelu_quant_ref(hid, inv, 0.9, bits, prefix=pre), frac)


def test_references_equal_the_model_ops_then_act_quant(rng):
    """The references compute what the unfused model does: its group (fp32 here) then act_quant_ref."""
    b, l, c = 1, 11, 256
    x, y = (torch.randn(b, l, c, generator=rng) for _ in range(2))
    shift, scale, gate = (torch.randn(b, 1, c, generator=rng) * 0.5 for _ in range(3))
    hid = torch.randn(b, l, 4 * c, generator=rng) * 2
    inv = _smooth(rng, c)
    agree(norm_modulate_quant_ref(x, shift, scale, inv, 0.9, 8)[1:],
          act_quant_ref(fusion.norm_modulate(x, shift, scale), 8, inv, 0.9), 2e-3)
    xr, h = fusion.gated_residual_norm_modulate(x, y, gate, shift, scale)
    xo, *got = norm_modulate_quant_ref(x, shift, scale, inv, 0.9, 8, residual=y, gate=gate)
    torch.testing.assert_close(xo, xr, rtol=1e-6, atol=1e-6)
    agree(got, act_quant_ref(h, 8, inv, 0.9), 2e-3)
    agree(gelu_quant_ref(hid, None, 1.0, 8), act_quant_ref(F.gelu(hid, approximate="tanh"), 8), 2e-3)
    inv5 = _smooth(rng, 5 * c)
    agree(gelu_quant_ref(hid, inv5, 0.9, 8, prefix=x), act_quant_ref(fusion.concat_gelu(x, hid), 8, inv5, 0.9), 2e-3)


def test_bad_input_gets_clear_errors(rng):
    x = torch.randn(1, 4, 64, generator=rng)
    v = torch.randn(1, 1, 64, generator=rng)
    with pytest.raises(ValueError, match="activation bits"):
        norm_modulate_quant(x, v, v, None, 1.0, 4)
    with pytest.raises(ValueError, match="both residual and gate"):
        norm_modulate_quant(x, v, v, None, 1.0, 8, residual=x)
    with pytest.raises(ValueError, match="shift must be"):
        norm_modulate_quant(x, torch.randn(1, 1, 32), v, None, 1.0, 8)
    with pytest.raises(ValueError, match="C <= 8192"):
        norm_modulate_quant(torch.randn(1, 2, 9000), torch.randn(1, 1, 9000), torch.randn(1, 1, 9000), None, 1.0, 8)
    with pytest.raises(ValueError, match="inv_smooth must have shape"):
        gelu_quant(x, torch.ones(10), 1.0, 8)
    with pytest.raises(ValueError, match="leading dims"):
        gelu_quant(x, None, 1.0, 8, prefix=torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="unknown gelu_quant config keys"):
        gelu_quant(x, None, 1.0, 8, config=dict(BLOCK=64))
    with pytest.raises(ValueError, match=r"NVIDIA sm_75\+ GPUs only"):
        gelu_quant(x, None, 1.0, 8, config=dict(MATH=1))   # PTX forms on CPU tensors
    with pytest.raises(ValueError, match="must be 0"):
        gelu_quant(x, None, 1.0, 8, config=dict(MATH=2))
    with pytest.raises(ValueError, match="unknown norm_modulate_quant config keys"):
        norm_modulate_quant(x, v, v, None, 1.0, 8, config=dict(BLOCK=64))
    with pytest.raises(ValueError, match="power of two"):
        norm_modulate_quant(x, v, v, None, 1.0, 8, config=dict(ROWS=3))

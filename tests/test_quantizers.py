"""Quantizers and packing against float64 references."""
import pytest
import torch

from quantsparse_core.dispatch import pack_int4, unpack_int4
from quantsparse_core.quant.quantizers import (absmax_scale, check_bits, fake_quant, qmax, quantize,
                                               quantize_per_token)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_per_channel_weight_round_trip_error_bound(rng, bits):
    w = torch.randn(64, 96, generator=rng, dtype=torch.float64)
    scale = absmax_scale(w, bits, dim=1)
    deq = quantize(w, scale, bits).double() * scale
    # Symmetric uniform rounding: error at most half a step per element, per output channel.
    assert ((w - deq).abs() <= scale / 2 + 1e-12).all()
    # The largest magnitude of each row is represented exactly.
    idx = w.abs().argmax(1)
    torch.testing.assert_close(deq.gather(1, idx[:, None]), w.gather(1, idx[:, None]), atol=1e-12, rtol=0)
    # Relative error shrinks ~2x per extra bit: bound by the uniform-noise estimate step^2/12 (x1.5 slack).
    rel = ((w - deq).norm() / w.norm()).item()
    expected = ((scale ** 2 / 12).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    assert rel < 1.5 * expected


@pytest.mark.parametrize("bits", [6, 8])
def test_per_token_activation_codes_match_reference(rng, bits):
    x = torch.randn(5, 7, 33, generator=rng) * torch.rand(5, 7, 1, generator=rng) * 10
    codes, scale = quantize_per_token(x, bits)
    ref_scale = x.double().abs().amax(-1, keepdim=True) / qmax(bits)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    ref = torch.clamp(torch.round(x.double() / ref_scale), -qmax(bits), qmax(bits))
    mismatch = (codes.double() != ref).float().mean().item()
    assert mismatch < 1e-3  # only fp32 vs fp64 ties at .5 may differ
    assert codes.abs().max() <= qmax(bits)


def test_fake_quant_ste_gradient_is_identity_inside_range(rng):
    x = torch.randn(8, 16, generator=rng, requires_grad=True)
    scale = absmax_scale(x.detach(), 8, dim=1)
    fake_quant(x, scale, 8).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_int4_pack_round_trip_exact(rng):
    codes = torch.randint(-8, 8, (13, 40), generator=rng, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (13, 20)
    assert torch.equal(unpack_int4(packed), codes)
    # Nibble order: element 0 in the low nibble.
    assert (packed[0, 0] & 0xF).item() == (codes[0, 0].item() & 0xF)


def test_bad_bits_and_pack_inputs():
    with pytest.raises(ValueError, match="weight bits 3"):
        check_bits(3, 8)
    with pytest.raises(ValueError, match="activation bits 4"):
        check_bits(4, 4)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 2), 9, dtype=torch.int8))

"""QuantLinear: transforms are exact, fake and real modes agree, rotation tames outliers."""
import pytest
import torch

from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.quant.transforms import OrthogonalFactor, apply_kron, hadamard, kron_factors


def _linear(rng, n_in=48, n_out=40):
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=rng) * 0.1)
        lin.bias.copy_(torch.randn(n_out, generator=rng) * 0.1)
    return lin


def _randomize_transforms(q, rng):
    with torch.no_grad():
        if q.log_smooth is not None:
            q.log_smooth.copy_(torch.randn(q.in_features, generator=rng) * 0.5)
        for f in (q.r1, q.r2):
            if f is not None:
                f.param.copy_(torch.randn(f.param.shape, generator=rng) * 0.3)


def test_apply_kron_matches_explicit_kronecker(rng):
    for n in (48, 64, 7 * 11):
        n1, n2 = kron_factors(n)
        assert n1 * n2 == n
        r1, r2 = hadamard(n1), hadamard(n2)
        torch.testing.assert_close(r1 @ r1.T, torch.eye(n1, dtype=torch.float64), atol=1e-12, rtol=0)
        x = torch.randn(5, n, generator=rng, dtype=torch.float64)
        torch.testing.assert_close(apply_kron(x, r1, r2), x @ torch.kron(r1, r2), atol=1e-12, rtol=0)


def test_folding_preserves_the_float_output(rng):
    """x diag(1/s) R (W diag(s) R)^T == x W^T for the learned transforms (no quantization)."""
    q = QuantLinear(_linear(rng), w_bits=8, a_bits=16, smooth=True, rotation="learned").double()
    _randomize_transforms(q, rng)
    x = torch.randn(7, 48, generator=rng, dtype=torch.float64)
    folded = q.transform_input(x) @ q.transformed_weight().T
    torch.testing.assert_close(folded, x @ q.weight.T, atol=1e-9, rtol=1e-9)


def test_orthogonal_factor_stays_orthogonal_while_trained(rng):
    f = OrthogonalFactor(hadamard(8).float())
    opt = torch.optim.AdamW(f.parameters(), lr=0.1)
    target = torch.randn(8, 8, generator=rng)
    for _ in range(20):
        loss = ((f() - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = f().detach()
    assert f.param.abs().max() > 0.01  # it moved
    torch.testing.assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)


@pytest.mark.parametrize("w_bits,a_bits", [(4, 8), (6, 6), (8, 8), (4, 16)])
@pytest.mark.parametrize("rotation", [None, "hadamard", "learned"])
def test_fake_and_real_modes_agree(rng, w_bits, a_bits, rotation):
    q = QuantLinear(_linear(rng), w_bits, a_bits, smooth=True, rotation=rotation)
    _randomize_transforms(q, rng)
    x = torch.randn(3, 9, 48, generator=rng)
    with torch.no_grad():
        fake = q(x)
        real = q.freeze()(x)
    assert q.weight is None and q.w_packed.dtype == (torch.uint8 if w_bits == 4 else torch.int8)
    assert ((real - fake).norm() / fake.norm()).item() < 1e-5


def test_quantization_error_shrinks_with_bits_and_rotation_tames_outliers(rng):
    lin = _linear(rng, 64, 64)
    x = torch.randn(256, 64, generator=rng)
    x[:, :3] *= 40  # outlier channels, as in real DiT activations
    ref = lin(x).detach()

    def err(**kw):
        with torch.no_grad():
            return ((QuantLinear(lin, **kw)(x) - ref).norm() / ref.norm()).item()

    e8, e6, e4 = err(w_bits=8, a_bits=8), err(w_bits=6, a_bits=6), err(w_bits=4, a_bits=8)
    assert e8 < e6 < e4
    # Where activation error dominates (A6), rotating spreads the outlier channels and cuts the
    # error (measured ~2x here); at W4A8 the Gaussian weights' error dominates and rotation is neutral.
    plain, rotated = err(w_bits=6, a_bits=6), err(w_bits=6, a_bits=6, rotation="hadamard")
    assert rotated < 0.7 * plain, (plain, rotated)


def test_bad_settings():
    with pytest.raises(ValueError, match="weight bits 5"):
        QuantLinear(torch.nn.Linear(8, 8), w_bits=5)
    with pytest.raises(ValueError, match="rotation must be"):
        QuantLinear(torch.nn.Linear(8, 8), rotation="random")

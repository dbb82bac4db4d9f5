"""kernels.gram (per-head Gram matrices of an SSAR residual) against the float64 reference: in the CPU
interpreter at small shapes (several row chunks, a partial last one, B > 1, head_dim 16 and 64), the
dispatch from low_rank.gram_matrices, bad input; on a GPU at the 720p shape."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_kernels.gram_ref import head_gram_ref
from quantsparse_core.sparse.low_rank import gram_matrices, heads_first, truncated_factors
from kernel_marks import interpreted


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@interpreted
@pytest.mark.parametrize("b,length,heads,d", [(2, 300, 3, 16), (1, 130, 2, 64)])
def test_head_gram_equals_float64_reference(rng, monkeypatch, b, length, heads, d):
    from quantsparse_kernels import gram
    monkeypatch.setattr(gram, "CHUNK", 128)     # several chunks (130 rows: a 2-row last one)
    x = torch.randn(b, length, heads * d, generator=rng) * 3 + 0.5
    g = gram.head_gram(x, heads)
    assert g.dtype == torch.float64 and g.shape == (b, heads, d, d)
    assert rel(g, head_gram_ref(x, heads)) < 1e-5       # bf16 hi + lo split (~2^-17), float64 sum of chunks


@interpreted
def test_head_gram_one_partial_chunk_strided_and_empty(rng):
    from quantsparse_kernels import gram
    x = torch.randn(3, 70, 2 * 16 + 5, generator=rng)[..., 5:]        # L < CHUNK, B > 1, a row-strided view
    assert rel(gram.head_gram(x, 2), head_gram_ref(x, 2)) < 1e-5
    for shape in ((2, 0, 32), (0, 9, 32)):
        g = gram.head_gram(torch.randn(shape, generator=rng), 2)
        assert g.shape == (shape[0], 2, 16, 16) and not g.any()


@interpreted
def test_gram_matrices_dispatches_to_the_kernel_for_a_residual_view(rng, monkeypatch):
    from quantsparse_kernels import gram
    calls = []
    monkeypatch.setattr(gram, "head_gram", lambda x, h, f=gram.head_gram: calls.append(h) or f(x, h))
    x = torch.randn(1, 200, 4 * 16, generator=rng)
    ref = gram_matrices(heads_first(x, 4))              # auto on CPU tensors: the float64 torch path
    assert not calls
    with dispatch.forced("triton"):
        got = gram_matrices(heads_first(x, 4))
        assert calls == [4]
        assert rel(got, ref) < 1e-5
        # not a heads_first view of a [B, L, H*D] residual: the torch path
        gram_matrices(torch.randn(1, 4, 200, 16, generator=rng))
        assert calls == [4]
        us, vh = truncated_factors(x, 4, 3)             # the truncation through the kernel
    us_ref, vh_ref = truncated_factors(x, 4, 3)
    # The rank-3 truncation moves as the Gram's error over the eigengap (Davis-Kahan), and a random x can
    # have close 3rd / 4th eigenvalues: error x relative gap (min over heads) was 1.8e-7 +- 0.7e-7, at most
    # 4.5e-7, over 4500 draws, 5 of which (gaps < 0.002) broke a fixed 1e-4; typical gaps (~0.02) keep 1e-4
    ev = torch.linalg.eigvalsh(ref)                                    # ascending, [1, 4, 16]
    gap = float(((ev[..., -3] - ev[..., -4]) / ev[..., -1]).min())
    assert rel(us @ vh, us_ref @ vh_ref) < max(1e-4, 1e-6 / gap), gap


def test_bad_input_gets_a_clear_error(monkeypatch):
    from quantsparse_kernels import gram
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        gram.head_gram(torch.randn(1, 8, 3 * 24), 3)
    with pytest.raises(ValueError, match="fp32"):
        gram.head_gram(torch.randn(1, 8, 64, dtype=torch.float64), 4)
    monkeypatch.setattr(gram, "CHUNK", 100)          # would count a chunk's last rows twice
    with pytest.raises(ValueError, match="multiple of BLOCK_L"):
        gram.head_gram(torch.randn(1, 8, 64), 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_head_gram_on_gpu_at_720p(rng):
    """24 heads x 128 over 119,056 rows (a partial last chunk), as SSAR's refresh gives it: within 5e-5
    of the float64 Gram (bf16 hi/lo products, fp32 tensor-core sums per 4,096 rows: 1.5e-5 measured on
    an H200; the rank-16 truncation it feeds drops far more). On a residual of rank 16 plus noise, the
    truncation through the kernel reconstructs what the float64 path does."""
    from quantsparse_kernels import gram
    x = (torch.randn(1, 119056, 3072, generator=rng) * 0.05 + 0.01).cuda()
    got = gram.head_gram(x, 24)
    with dispatch.forced("torch"):
        ref = gram_matrices(heads_first(x[:, :, :256].contiguous(), 2))   # two heads, the float64 path
    assert rel(got[:, :2], ref) < 5e-5
    assert torch.equal(gram_matrices(heads_first(x, 24)), got)         # what SSAR's refresh calls
    assert rel(got, head_gram_ref(x, 24)) < 5e-5
    del x, got
    u = torch.randn(1, 119056, 16, generator=rng).cuda()
    spread = torch.logspace(0, -1.5, 16, device="cuda")                 # distinct singular values
    low = (u * spread) @ torch.randn(16, 3072, generator=rng).cuda()
    low += torch.randn(low.shape, generator=rng).cuda() * 1e-3
    us, vh = truncated_factors(low, 24, 16)
    with dispatch.forced("torch"):
        us_r, vh_r = truncated_factors(low, 24, 16)
    assert rel(us @ vh, us_r @ vh_r) < 1e-4

"""ComfyUI runs every node under torch.inference_mode(): the kernel paths must work on inference
tensors (which have no version counter) and give the same numbers as outside it."""
import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_core.quant.linear import QuantLinear
from quantsparse_core.sparse.masks import BlockMask, band_keep
from quantsparse_core.dispatch import block_sparse_attention

pytestmark = [
    pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed"),
    pytest.mark.skipif(torch.cuda.is_available() and not dispatch.interpreting(),
                       reason="runs the kernels in Triton's CPU interpreter; on a GPU see test_kernels_cuda.py"),
]


def test_quant_linear_kernel_path_under_inference_mode(rng):
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=rng) * 0.1)
    q = QuantLinear(lin, 4, 8, smooth=False).freeze()
    x = torch.randn(5, 64, generator=rng)
    with torch.inference_mode():
        built = QuantLinear.from_packed(64, 32, 4, 8, False, None, q.packed_tensors())  # inference tensors
        with dispatch.forced("torch"):
            ref = built(x)
        with dispatch.forced("triton"):
            got = built(x)
            again = built(x)                                  # the cached layout is reused
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(got, again)


def test_sparse_attention_kernel_path_under_inference_mode(rng):
    txt, grid = 5, (2, 4, 4)
    length = txt + 32
    q, k, v = (torch.randn(1, 2, length, 32, generator=rng) for _ in range(3))
    corr = torch.randn(1, length, 64, generator=rng)
    keep = band_keep(length, txt, 0.5, block=8)
    with dispatch.forced("torch"):
        ref = block_sparse_attention(q, k, v, None, BlockMask(torch.stack([keep, keep]), ["spatial", "temporal"], 8,
                                                              length), txt, grid, correction=corr)
    with torch.inference_mode():
        mask = BlockMask(torch.stack([keep, keep]).clone(), ["spatial", "temporal"], 8, length)
        with dispatch.forced("triton"):
            got = block_sparse_attention(q, k, v, None, mask, txt, grid, correction=corr)
            again = block_sparse_attention(q, k, v, None, mask, txt, grid, correction=corr)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got, again)

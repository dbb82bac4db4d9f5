"""models.attention.dense_attention leaves out the keys a text-padding mask blocks (so SDPA can run its
unmasked fused kernels); the output must equal masked attention, checked against float64."""
import pytest
import torch

from quantsparse_core.models.attention import AttentionCall, allowed_keys, dense_attention

CALL = AttentionCall("double", 0, 1, 6, (1, 2, 5))


def _reference(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        m = mask.double()
        s = s + (m.unsqueeze(1) if m.ndim == 3 else m)
    out = torch.softmax(s, -1) @ v.double()
    b, h, l, d = out.shape
    return out.transpose(1, 2).reshape(b, l, h * d)


def _qkv(rng, b=2, h=3, length=16, d=8):
    return [torch.randn(b, h, length, d, generator=rng) * 2 for _ in range(3)]


@pytest.mark.parametrize("floor", [-1.0e4, -torch.finfo(torch.float32).max], ids=["pack-floor", "comfy-finfo-max"])
@pytest.mark.parametrize("layout", ["B11L", "11L", "B111L"])
def test_padding_mask_gives_masked_attention(rng, floor, layout):
    q, k, v = _qkv(rng)
    pad = int(torch.randint(1, 5, (1,), generator=rng))
    row = torch.zeros(16)
    row[6 - pad:6] = floor                     # padded text tokens, text first
    mask = {"B11L": row.expand(2, 1, 16).clone(), "11L": row.view(1, 1, 16),
            "B111L": row.view(1, 1, 1, 16).expand(2, 1, 1, 16).clone()}[layout]
    keep = allowed_keys(mask)
    assert isinstance(keep, torch.Tensor) and keep.tolist() == [i for i in range(16) if not 6 - pad <= i < 6]
    got = dense_attention(q, k, v, mask, CALL)
    torch.testing.assert_close(got.double(), _reference(q, k, v, mask.clamp(min=-1e30)), atol=1e-5, rtol=1e-5)


def test_masks_it_cannot_shorten_keep_the_masked_path(rng):
    q, k, v = _qkv(rng)
    soft = torch.randn(1, 1, 16, generator=rng)           # a bias, not a block
    per_entry = torch.zeros(2, 1, 16)
    per_entry[0, 0, 3] = -1e4                              # batch entries differ
    per_query = torch.zeros(1, 1, 16, 16)
    per_query[..., 2, 5] = -1e4                            # query-dependent
    for mask in (soft, per_entry, per_query):
        assert allowed_keys(mask) is None
        got = dense_attention(q, k, v, mask, CALL)
        torch.testing.assert_close(got.double(), _reference(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert allowed_keys(torch.zeros(1, 1, 16)) == "all"
    torch.testing.assert_close(dense_attention(q, k, v, torch.zeros(1, 1, 16), CALL).double(),
                               _reference(q, k, v, None), atol=1e-5, rtol=1e-5)


def test_answer_is_kept_per_mask_object_only(rng):
    """The same tensor object is answered from the memo; a new mask (even at the same address) is read again."""
    a = torch.zeros(1, 1, 16)
    a[..., 4] = -1e4
    assert allowed_keys(a).tolist() == [i for i in range(16) if i != 4]
    a2 = torch.zeros(1, 1, 16)
    a2[..., 9] = -1e4
    assert allowed_keys(a2).tolist() == [i for i in range(16) if i != 9]
    del a
    b = torch.zeros(1, 1, 16)
    assert allowed_keys(b) == "all"


def test_mask_changed_in_place_is_read_again():
    a = torch.zeros(1, 1, 16)
    assert allowed_keys(a) == "all"
    a[..., 2] = -1e4
    assert allowed_keys(a).tolist() == [i for i in range(16) if i != 2]


def test_no_mask_takes_the_fused_kernel_order_too(rng, monkeypatch):
    """Without a mask (Wan's self-attention, unpadded text) attention runs under the same cuDNN-first backend
    order as a shortened mask, with the exact result."""
    import quantsparse_core.models.attention as attention
    seen = []
    real = attention._sdpa_backends
    monkeypatch.setattr(attention, "_sdpa_backends", lambda device: seen.append(device) or real(device))
    q, k, v = _qkv(rng)
    got = dense_attention(q, k, v, None, CALL)
    assert seen == [q.device]
    torch.testing.assert_close(got.double(), _reference(q, k, v, None), atol=1e-5, rtol=1e-5)

"""Sparse attention: layouts, SVG block masks, head classification, reference block-sparse kernel."""
import dataclasses
import math

import pytest
import torch

from quantsparse_core.models.attention import AttentionCall, dense_attention
from quantsparse_core.sparse import (BlockMask, band_keep, band_width_tokens, block_sparse_attention,
                                     inverse_permutation, svg_masks, temporal_permutation)
from quantsparse_core.sparse.masks import text_blocks


def qkv(rng, b, h, length, d):
    """Random, never-zero attention inputs."""
    return [torch.randn(b, h, length, d, generator=rng) for _ in range(3)]


def padding_mask(rng, b, txt_len, length):
    """Additive key mask like the model's: padded text tokens get -finfo.max."""
    mask = torch.zeros(b, 1, length)
    for i in range(b):
        real = int(torch.randint(1, txt_len + 1, (1,), generator=rng))
        mask[i, 0, real:txt_len] = -torch.finfo(torch.float32).max
    return mask


def token_allowed(block_mask, h, txt_len, grid):
    """[L, L] token-level mask of head h in the original order, built the slow obvious way."""
    n, blk = block_mask.seq_len, block_mask.block
    blocks = torch.arange(n) // blk
    allowed = block_mask.keep[h][blocks][:, blocks]
    if block_mask.permuted(h):
        inv = inverse_permutation(temporal_permutation(txt_len, grid))
        allowed = allowed[inv][:, inv]
    return allowed


def float64_reference(q, k, v, mask, block_mask, txt_len, grid):
    """Full L x L scores in float64 with -inf outside the kept blocks."""
    b, heads, n, d = q.shape
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask.double()[:, :, None, :]
    allowed = torch.stack([token_allowed(block_mask, h, txt_len, grid) for h in range(heads)])
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v.double()
    return out.transpose(1, 2).reshape(b, n, heads * d)


def assert_close_rel(out, ref, tol=1e-5):
    err = float((out.double() - ref).abs().max() / ref.abs().max())
    assert err < tol, f"relative error {err:.2e}"


def test_temporal_permutation_roundtrip_and_order():
    txt_len, (t, h, w) = 5, (3, 2, 4)
    perm = temporal_permutation(txt_len, (t, h, w), seq_len=txt_len + t * h * w)
    inv = inverse_permutation(perm)
    x = torch.arange(len(perm))
    assert torch.equal(x[perm][inv], x) and torch.equal(x[inv][perm], x)
    assert torch.equal(perm[:txt_len], torch.arange(txt_len))
    # Position txt_len + (y*w + x)*t + f in the new order holds frame f of spatial location (y, x).
    for y in range(h):
        for xx in range(w):
            for f in range(t):
                new = txt_len + (y * w + xx) * t + f
                assert int(perm[new]) == txt_len + f * h * w + y * w + xx


def test_bad_inputs_raise():
    q = torch.ones(1, 1, 20, 4)
    for d in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            svg_masks(q, q, q, None, 4, (2, 2, 4), d, block=8)
        with pytest.raises(ValueError, match="density"):
            band_keep(20, 4, d, 8)
    with pytest.raises(ValueError, match="does not match"):
        svg_masks(q, q, q, None, 4, (2, 3, 4), 0.5, block=8)
    with pytest.raises(ValueError, match="does not match"):
        temporal_permutation(4, (2, 3, 4), seq_len=20)


@pytest.mark.parametrize("block", [16, 128])
def test_density_one_equals_dense(rng, block):
    txt_len, grid = 7, (3, 5, 6) if block == 16 else (4, 8, 9)
    n = txt_len + grid[0] * grid[1] * grid[2]
    q, k, v = qkv(rng, 2, 3, n, 16)
    mask = padding_mask(rng, 2, txt_len, n)
    bm = svg_masks(q, k, v, mask, txt_len, grid, 1.0, block=block, generator=rng)
    assert bm.kinds == ["dense"] * 3 and bool(bm.keep.all()) and bm.density() == 1.0
    call = AttentionCall("double", 0, 1, txt_len, grid)
    for m in (None, mask):
        assert_close_rel(block_sparse_attention(q, k, v, m, bm, txt_len, grid), dense_attention(q, k, v, m, call).double())


@pytest.mark.parametrize("txt_len,grid,densities", [
    (24, (8, 16, 16), (0.25, 0.4)),            # L = 2072, 17 blocks
    (24, (8, 30, 40), (0.1, 0.15, 0.25, 0.4)),  # L = 9624, 76 blocks
    (256, (33, 45, 80), (0.1, 0.15, 0.25, 0.4)),  # HunyuanVideo 720p x 129 frames, L = 119056
])
def test_realized_density_matches_request(txt_len, grid, densities):
    n = txt_len + grid[0] * grid[1] * grid[2]
    for d in densities:
        keep = band_keep(n, txt_len, d)
        for kind in ("spatial", "temporal"):
            realized = BlockMask(keep[None], [kind], 128, n).density()
            assert abs(realized - d) < 0.02, (d, kind, realized)
        # The full band agrees with METHOD.md's width formula within a block or two.
        full = 0
        while full + 1 < keep.shape[0] and bool(torch.diagonal(keep, full + 1).all()):
            full += 1
        if n > 5000:
            assert abs(full - band_width_tokens(d, n, txt_len) / 128) < 2


def test_density_below_minimum_gives_minimum_mask():
    """At L = 2072 a diagonal plus the text block already keeps ~17.7%: 10% cannot be met."""
    keep = band_keep(2072, 24, 0.1)
    nb = keep.shape[0]
    expected = torch.eye(nb, dtype=torch.bool)
    expected[0, :] = expected[:, 0] = True
    assert torch.equal(keep, expected)


def test_svg_mask_density_text_and_indices(rng):
    txt_len, grid = 24, (8, 16, 16)
    n = 2072
    q, k, v = qkv(rng, 1, 2, n, 8)
    bm = svg_masks(q, k, v, None, txt_len, grid, 0.25, generator=rng)
    assert abs(bm.density() - 0.25) < 0.02 and set(bm.kinds) <= {"spatial", "temporal"}
    index, count = bm.to_indices()
    for h in range(2):
        for i in range(bm.keep.shape[1]):
            kept = index[h, i, :count[h, i]].long()
            assert torch.equal(kept, bm.keep[h, i].nonzero().flatten())
            assert bool((index[h, i, count[h, i]:] == -1).all())


def test_svg_masks_share_one_band_and_its_indices(rng):
    """Refreshes of different layers get masks viewing one shared band, whose precomputed indices and
    density (computed once, no per-layer host sync) equal what a fresh mask computes from keep."""
    from quantsparse_core.sparse.ssar import _same_mask
    txt_len, grid = 24, (8, 16, 16)
    n = 2072
    a = svg_masks(*qkv(rng, 1, 3, n, 8), None, txt_len, grid, 0.25, generator=rng)
    b = svg_masks(*qkv(rng, 1, 3, n, 8), None, txt_len, grid, 0.25, generator=rng)
    assert a.keep.data_ptr() == b.keep.data_ptr() and a.to_indices()[0] is b.to_indices()[0]
    fresh = BlockMask(a.keep.clone(), list(a.kinds), a.block, a.seq_len)
    for got, ref in zip(a.to_indices(), fresh.to_indices()):
        assert torch.equal(got, ref)
    assert a.density() == fresh.density()
    b.kinds = list(a.kinds)
    assert _same_mask(a, b) and _same_mask(a, fresh)
    b.kinds[0] = "temporal" if a.kinds[0] == "spatial" else "spatial"
    assert not _same_mask(a, b)
    other = dataclasses.replace(a, keep=~a.keep)   # a mask built from another keep starts without them
    assert other.known is None and other.density() == pytest.approx(1.0 - a.density())


@pytest.mark.parametrize("txt_len,grid,block,density", [(10, (4, 6, 5), 16, 0.3), (3, (5, 4, 4), 32, 0.5), (40, (2, 3, 4), 16, 0.2)])
def test_text_rows_and_columns_always_kept(txt_len, grid, block, density):
    n = txt_len + grid[0] * grid[1] * grid[2]
    keep = band_keep(n, txt_len, density, block)
    nt = text_blocks(txt_len, block)
    assert bool(keep[:nt].all()) and bool(keep[:, :nt].all())
    for kind in ("spatial", "temporal"):
        allowed = token_allowed(BlockMask(keep[None], [kind], block, n), 0, txt_len, grid)
        assert bool(allowed[:txt_len].all()) and bool(allowed[:, :txt_len].all())


@pytest.mark.parametrize("with_mask", [False, True])
def test_block_sparse_matches_float64_reference(rng, with_mask):
    # L = 9 + 5*4*5 = 109: not a multiple of 16, so the last block is partial.
    txt_len, grid, block = 9, (5, 4, 5), 16
    n = txt_len + 100
    b, heads = 2, 4
    q, k, v = qkv(rng, b, heads, n, 8)
    q = q * 2.0  # sharper attention makes mask errors visible
    mask = padding_mask(rng, b, txt_len, n) if with_mask else None
    nb = -(-n // block)
    band = band_keep(n, txt_len, 0.35, block)
    # A random (non-band) pattern too, with the text block kept so no row is empty.
    rand = torch.rand(nb, nb, generator=rng) < 0.4
    rand[0, :] = rand[:, 0] = True
    keep = torch.stack([band, band, rand, torch.ones(nb, nb, dtype=torch.bool)])
    bm = BlockMask(keep, ["spatial", "temporal", "temporal", "dense"], block, n)
    out = block_sparse_attention(q, k, v, mask, bm, txt_len, grid)
    assert out.shape == (b, n, heads * 8) and torch.isfinite(out).all()
    assert_close_rel(out, float64_reference(q, k, v, mask, bm, txt_len, grid))
    # All heads spatial, all heads temporal.
    for kind in ("spatial", "temporal"):
        bm = BlockMask(keep, [kind] * heads, block, n)
        assert_close_rel(block_sparse_attention(q, k, v, mask, bm, txt_len, grid),
                         float64_reference(q, k, v, mask, bm, txt_len, grid))


def test_block_sparse_block128_and_small_chunks(rng, monkeypatch):
    """Block 128 with a partial last block, and chunking across query blocks."""
    import quantsparse_kernels.sparse_attention_ref as reference
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 128 * 128 * 3)
    txt_len, grid = 20, (4, 10, 12)
    n = txt_len + 480
    q, k, v = qkv(rng, 1, 2, n, 16)
    mask = padding_mask(rng, 1, txt_len, n)
    bm = svg_masks(q, k, v, mask, txt_len, grid, 0.6, generator=rng)
    bm.kinds = ["spatial", "temporal"]
    assert_close_rel(block_sparse_attention(q, k, v, mask, bm, txt_len, grid),
                     float64_reference(q, k, v, mask, bm, txt_len, grid))


def test_no_visible_key_gives_zeros_not_nan(rng):
    txt_len, grid, block = 0, (2, 4, 4), 8
    q, k, v = qkv(rng, 1, 1, 32, 4)
    keep = torch.eye(4, dtype=torch.bool)[None].clone()
    keep[0, 1, 1] = False  # query block 1 visits nothing
    out = block_sparse_attention(q, k, v, None, BlockMask(keep, ["spatial"], block, 32), txt_len, grid)
    assert torch.isfinite(out).all() and bool((out[0, 8:16] == 0).all())


def test_head_classification(rng):
    """Head 0 attends within its own frame, head 1 to its own (y, x) in every frame."""
    txt_len, (t, h, w), block = 8, (8, 4, 4), 16
    n = txt_len + t * h * w
    d, scale = 32, 40.0
    frame = torch.arange(t).repeat_interleave(h * w)
    pos = torch.arange(h * w).repeat(t)
    q = torch.randn(1, 2, n, d, generator=rng) * 0.1
    k = torch.randn(1, 2, n, d, generator=rng) * 0.1
    v = torch.randn(1, 2, n, d, generator=rng)
    vid = torch.arange(txt_len, n)
    q[0, 0, vid, 16 + frame] += scale
    k[0, 0, vid, 16 + frame] += 1.0
    q[0, 1, vid, pos] += scale
    k[0, 1, vid, pos] += 1.0
    bm = svg_masks(q, k, v, None, txt_len, (t, h, w), 0.3, block=block, generator=rng)
    assert bm.kinds == ["spatial", "temporal"], bm.errors
    assert bool(bm.errors[0, 0] < bm.errors[0, 1]) and bool(bm.errors[1, 1] < bm.errors[1, 0])


@pytest.mark.parametrize("n_video,n", [(2048, 64), (100, 64), (64, 64), (10, 64)])
def test_sample_rows_distinct_stratified(rng, n_video, n):
    from quantsparse_core.sparse.masks import sample_rows
    txt_len, heads = 7, 5
    rows = sample_rows(heads, txt_len, n_video, n, rng)
    m = min(n, n_video)
    assert rows.shape == (heads, m)
    assert bool((rows >= txt_len).all()) and bool((rows < txt_len + n_video).all())
    for r in rows:
        assert len(set(r.tolist())) == m  # distinct
        # stratified: the i-th row lies in the i-th of m equal slices of the video rows
        edges = [(i * n_video) // m for i in range(m + 1)]
        assert all(edges[i] <= int(x) - txt_len < edges[i + 1] for i, x in enumerate(r))


def test_svg_errors_match_per_head_float64(rng, monkeypatch):
    """The chunked, vectorized classification computes, per head, the sampled-row MSE of the spatial
    and temporal masks exactly as a plain per-head float64 computation does (chunks of 2 heads)."""
    import quantsparse_core.sparse.masks as masks
    txt_len, grid, block = 9, (4, 5, 6), 16
    n = txt_len + 120
    b, heads, d = 2, 5, 8
    q, k, v = qkv(rng, b, heads, n, d)
    q = q * 2.0
    mask = padding_mask(rng, b, txt_len, n)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=rng))
    monkeypatch.setattr(masks, "HEAD_CHUNK_ELEMENTS", 2 * b * 64 * n)
    bm = svg_masks(q.double(), k.double(), v.double(), mask.double(), txt_len, grid, 0.35, 64, block,
                   torch.Generator().manual_seed(seed))
    rows = masks.sample_rows(heads, txt_len, n - txt_len, 64, torch.Generator().manual_seed(seed))
    band = band_keep(n, txt_len, 0.35, block)
    for h in range(heads):
        scores = (q[:, h, rows[h]].double() @ k[:, h].double().mT) / math.sqrt(d) + mask.double()
        exact = torch.softmax(scores, -1) @ v[:, h].double()
        for c, kind in enumerate(("spatial", "temporal")):
            allowed = token_allowed(BlockMask(band[None], [kind], block, n), 0, txt_len, grid)[rows[h]]
            approx = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v[:, h].double()
            want = float(((approx - exact) ** 2).mean())
            assert abs(float(bm.errors[h, c]) - want) <= 1e-9 * max(want, 1e-12), (h, kind)
        assert bm.kinds[h] == ("spatial" if bm.errors[h, 0] <= bm.errors[h, 1] else "temporal")


@pytest.mark.parametrize("length,piece", [(1000, 64), (1024, 256), (300, 256)])
def test_split_k_matmul_matches_float64(rng, length, piece):
    """The piecewise reduction used by the head classification equals one matmul (odd L: padding)."""
    from quantsparse_core.sparse.masks import split_k_matmul
    p = torch.rand(2, 3, 5, length, generator=rng)
    v = torch.randn(2, 3, length, 7, generator=rng)
    out = split_k_matmul(p, v, piece)
    ref = p.double() @ v.double()
    assert out.shape == ref.shape
    assert float((out.double() - ref).abs().max() / ref.abs().max()) < 1e-5

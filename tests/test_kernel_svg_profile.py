"""kernels.svg_profile (SVG head classification, Triton in the CPU interpreter) against the float64
reference: partial last key tile, padded text, B > 1, row counts off the row tile, key bias with
-inf, rows with no allowed key, strided q/k/v; svg_masks picks the same kinds through the kernel as
through its PyTorch path. A CUDA test at the 720p shape compares with the PyTorch path there."""
import math

import pytest
import torch

from quantsparse_core import dispatch
from quantsparse_kernels.svg_profile_ref import svg_errors_ref
from quantsparse_core.sparse.layout import inverse_permutation, temporal_permutation
from quantsparse_core.sparse.masks import band_keep, sample_rows, svg_masks
from kernel_marks import interpreted


# Tolerances on the per-head MSE, relative (seen: ~1e-7 fp32 and fp16, ~3e-6 bf16). fp32 / fp16
# inputs: IEEE fp32 products summed in another order than float64. bf16 inputs: q, k, v are exact
# in float64 as in the kernel, but P @ V splits p into two bf16 parts (16 significant bits; the
# interpreter truncates where the GPU rounds: up to ~2^-15 relative per weight), and the MSE of the
# restricted - exact difference magnifies the outputs' relative error by ~2 |output| / |difference|.
TOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 3e-4}


def strided_qkv(rng, b, h, length, d, dtype, scale=2.0):
    """[B, H, L, D] views of one fused [B, L, 3, H, D] tensor, as the model passes them; random,
    never zero; q scaled up so attention is peaked and the two masks' errors differ."""
    qkv = torch.randn(b, length, 3, h, d, generator=rng)
    qkv[:, :, 0] *= scale
    qkv = qkv.to(dtype)
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def layout(txt_len, grid, density, block):
    length = txt_len + math.prod(grid)
    inv = inverse_permutation(temporal_permutation(txt_len, grid))
    return length, band_keep(length, txt_len, density, block), inv


def bias_with_inf(rng, b, length, txt_len):
    """Random additive key bias with ComfyUI's padded text (-inf) in the first batch row."""
    bias = torch.randn(b, length, generator=rng)
    bias[0, txt_len // 2:txt_len] = float("-inf")
    return bias


def rel_per_head(a, b):
    return ((a - b).abs() / b.abs()).max().item()


@interpreted
@pytest.mark.parametrize("dtype,b,h,d,block,txt_len,grid,n_rows,bias,config,splits", [
    # L = 229 (last 64-key tile partial), 3 splits, rows in one tile
    (torch.float32, 2, 3, 32, 16, 13, (4, 6, 9), 21, True, None, None),
    # L = 501, 40 rows in 16-row tiles (8 in the last), 5 splits, [1, L] bias
    (torch.bfloat16, 1, 5, 16, 32, 21, (5, 8, 12), 40, "one", (16, 32, 4, 1), 5),
    # block 48 (16-key tiles), fp16 through IEEE products, one split
    (torch.float16, 2, 2, 32, 48, 7, (3, 10, 10), 9, None, None, 1),
    # bf16 with the IEEE P @ V option, L = 319
    (torch.bfloat16, 2, 2, 32, 32, 31, (2, 12, 12), 33, True, (32, 64, 4, 1, "ieee"), None),
], ids=["fp32-B2-bias", "bf16-row-tiles-5-splits", "fp16-block48-1-split", "bf16-ieee"])
def test_errors_match_float64_reference(rng, dtype, b, h, d, block, txt_len, grid, n_rows, bias, config, splits):
    from quantsparse_kernels.svg_profile import svg_errors
    length, band, inv = layout(txt_len, grid, 0.3, block)
    q, k, v = strided_qkv(rng, b, h, length, d, dtype)
    rows = torch.stack([torch.randperm(length - txt_len, generator=rng)[:n_rows] + txt_len for _ in range(h)])
    key_bias = None
    if bias:
        key_bias = bias_with_inf(rng, b, length, txt_len)
        if bias == "one":
            key_bias = key_bias[:1]
    got = svg_errors(q, k, v, rows, band, inv, block, key_bias, splits=splits, config=config)
    want = svg_errors_ref(q, k, v, rows, band, inv, block, key_bias)
    assert got.shape == (h, 2) and got.dtype == torch.float64 and bool(torch.isfinite(got).all())
    assert bool((want > 0).all())
    assert rel_per_head(got, want) < TOL[dtype], (got, want)


@interpreted
@pytest.mark.parametrize("fill", [float("-inf"), -torch.finfo(torch.float32).max], ids=["-inf", "-finfo.max"])
def test_rows_with_no_allowed_key_give_zero_output(rng, fill):
    """Rows whose query block visits nothing give 0, as masks.masked_attention does: the error is then
    the exact output's mean square. A batch row whose keys are all masked gives 0 with -inf and the
    plain average with the finite -finfo.max (as in PyTorch: its scores do not overflow to -inf)."""
    from quantsparse_kernels.svg_profile import svg_errors
    txt_len, grid, block, b, h, d = 5, (3, 4, 6), 16, 2, 2, 16
    length, band, inv = layout(txt_len, grid, 0.4, block)
    band = band.clone()
    band[1] = False            # query block 1 (original order) visits no key: spatial rows there
    band[inv[20] // block] = False  # ... and the temporal block of row 20
    q, k, v = strided_qkv(rng, b, h, length, d, torch.float32)
    rows = torch.tensor([[16, 20, 31, 40, 60], [17, 18, 20, 50, 70]])
    key_bias = torch.randn(b, length, generator=rng)
    key_bias[1] = fill
    got = svg_errors(q, k, v, rows, band, inv, block, key_bias)
    want = svg_errors_ref(q, k, v, rows, band, inv, block, key_bias)
    assert bool(torch.isfinite(got).all()) and rel_per_head(got, want) < 1e-4


def structured_heads(rng, b, txt_len, grid, d):
    """Heads 0, 2: attend within their frame (spatial); heads 1, 3: to their own (y, x) in every frame
    (temporal); heads 4, 5: random. Float32 [B, 6, L, D], never zero."""
    t, hh, w = grid
    length = txt_len + t * hh * w
    frame = torch.arange(t).repeat_interleave(hh * w)
    pos = torch.arange(hh * w).repeat(t)
    q, k, v = (torch.randn(b, 6, length, d, generator=rng) * s for s in (0.1, 0.1, 1.0))
    vid = torch.arange(txt_len, length)
    for head in (0, 2):
        q[:, head, vid, frame] += 40.0
        k[:, head, vid, frame] += 1.0
    for head in (1, 3):
        q[:, head, vid, pos % d] += 40.0
        k[:, head, vid, pos % d] += 1.0
    return q, k, v


@interpreted
@pytest.mark.parametrize("b,with_mask", [(1, False), (2, True)])
def test_svg_masks_kinds_through_kernel_equal_pytorch_path(rng, b, with_mask):
    txt_len, grid, block, d = 9, (4, 4, 8), 16, 32   # L = 137: partial last block
    q, k, v = structured_heads(rng, b, txt_len, grid, d)
    length = q.shape[2]
    mask = None
    if with_mask:
        mask = torch.zeros(b, 1, length)
        mask[0, :, 4:txt_len] = float("-inf")
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=rng))
    out = {}
    for mode in ("torch", "triton"):
        with dispatch.forced(mode):
            out[mode] = svg_masks(q, k, v, mask, txt_len, grid, 0.3, 24, block, torch.Generator().manual_seed(seed))
    et, ek = out["torch"].errors, out["triton"].errors
    assert rel_per_head(ek, et) < 1e-4, (ek, et)
    assert torch.equal(out["torch"].keep, out["triton"].keep)
    clear = ((et[:, 0] - et[:, 1]).abs() > 0.01 * et.max(1).values).tolist()
    assert all(clear[:4]), et  # the structured heads are clear cases
    for head, c in enumerate(clear):
        if c:
            assert out["triton"].kinds[head] == out["torch"].kinds[head], (head, et, ek)
    assert out["triton"].kinds[:4] == ["spatial", "temporal", "spatial", "temporal"], ek


@interpreted
def test_unsupported_inputs_take_the_pytorch_path(rng):
    """head_dim 8 and block 8 are not kernel shapes: forced Triton gives the PyTorch result exactly."""
    txt_len, grid = 4, (2, 4, 4)
    q, k, v = (torch.randn(1, 2, 36, 8, generator=rng) for _ in range(3))
    res = {}
    for mode in ("torch", "triton"):
        with dispatch.forced(mode):
            res[mode] = svg_masks(q, k, v, None, txt_len, grid, 0.5, 8, 8, torch.Generator().manual_seed(3))
    assert torch.equal(res["torch"].errors, res["triton"].errors)


@interpreted
def test_bad_input_is_refused_clearly(rng):
    from quantsparse_kernels.svg_profile import svg_errors
    txt_len, grid, block = 4, (2, 4, 4), 16
    length, band, inv = layout(txt_len, grid, 0.5, block)
    q, k, v = (torch.randn(1, 2, length, 16, generator=rng) for _ in range(3))
    rows = sample_rows(2, txt_len, length - txt_len, 8, rng)
    ok = dict(rows=rows, band=band, inv=inv, block=block)

    def call(**kw):
        a = {**dict(q=q, k=k, v=v, key_bias=None), **ok, **kw}
        return svg_errors(a["q"], a["k"], a["v"], a["rows"], a["band"], a["inv"], a["block"], a["key_bias"])

    assert call().shape == (2, 2)
    cases = [
        (dict(k=k[:, :, :-1]), "one shape"),
        (dict(q=q.double(), k=k.double(), v=v.double()), "dtype"),
        (dict(v=v.half()), "dtype"),
        (dict(q=q[..., :8], k=k[..., :8], v=v[..., :8]), "head_dim"),
        (dict(block=8), "block"),
        (dict(rows=rows[:1]), "rows"),
        (dict(rows=rows.float()), "rows"),
        (dict(band=band[:-1]), "band"),
        (dict(band=band.float()), "band"),
        (dict(inv=inv[:-1]), "inv"),
        (dict(key_bias=torch.zeros(1, length + 1)), "key_bias"),
        (dict(key_bias=torch.zeros(1, length, dtype=torch.long)), "key_bias"),
        (dict(rows=torch.zeros(2, 8, dtype=torch.long, device="meta")), "device"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="bf16"):
        svg_errors(q, k, v, rows, band, inv, block, config=(16, 16, 4, 1, "split"))


# ---- on a GPU, at the 720p shape --------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available() or dispatch.interpreting() or not dispatch.triton_available(),
                    reason="needs a CUDA device (compiled Triton)")
def test_720p_kernel_equals_pytorch_path_on_gpu(rng):
    """HunyuanVideo 720p (B=1, H=24, L=119,056, D=128, bf16, 64 rows, 15% band): the kernel's errors
    vs svg_masks' PyTorch path, 1e-3 per head; kinds equal wherever a head's two errors differ by > 1%.
    Half the heads get frame (spatial) or position (temporal) structure so the kinds are not all ties."""
    from quantsparse_core.sparse import masks
    txt_len, grid, heads, d = 256, (33, 45, 80), 24, 128
    length = txt_len + math.prod(grid)
    g = torch.Generator(device="cuda").manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    qkv = torch.randn(1, length, 3, heads, d, device="cuda", generator=g)
    t, hh, w = grid
    vid = torch.arange(txt_len, length, device="cuda")
    frame = torch.arange(t, device="cuda").repeat_interleave(hh * w)
    feats = torch.randn(hh * w, 64, device="cuda", generator=g).sign()  # one +-1 code per (y, x)
    pos = torch.arange(hh * w, device="cuda").repeat(t)
    for head in range(0, 12, 2):   # frame locality: spatial
        qkv[0, vid, 0, head, frame] += 40.0
        qkv[0, vid, 1, head, frame] += 1.0
    for head in range(1, 12, 2):   # same (y, x) across frames: temporal
        qkv[0, vid, 0, head, 64:] += 2.0 * feats[pos]
        qkv[0, vid, 1, head, 64:] += feats[pos]
    qkv = qkv.to(torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    band = masks._cached_band(length, txt_len, 0.15, 128)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=rng))
    out = {}
    for mode in ("torch", "triton"):
        with dispatch.forced(mode):
            out[mode] = svg_masks(q, k, v, None, txt_len, grid, 0.15, 64, 128, torch.Generator().manual_seed(seed))
    assert torch.equal(out["torch"].keep[0].cpu(), band)
    et, ek = out["torch"].errors, out["triton"].errors
    assert bool(torch.isfinite(ek).all()) and rel_per_head(ek, et) < 1e-3, (ek, et)
    for head in range(heads):
        if abs(float(et[head, 0] - et[head, 1])) > 0.01 * float(et[head].max()):
            assert out["triton"].kinds[head] == out["torch"].kinds[head], (head, et[head], ek[head])

"""The Triton kernels compiled on a real GPU, against their references (skipped without CUDA).
The interpreter tests (test_kernel_*.py) cover the same code on the CPU at tiny shapes; here the
shapes are large enough for the GPU code paths (persistent TMA GEMM at large M, many key blocks)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEV = "cuda"


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_act_quant_on_gpu_equals_reference(rng):
    from quantsparse_kernels.act_quant import act_quant
    from quantsparse_kernels.act_quant_ref import act_quant_ref
    for k in (3072, 1000, 12288):                         # one pass (rows in registers); two passes
        x = (torch.randn(4099, k, generator=rng) * 2).to(torch.bfloat16).to(DEV)
        inv_s = (torch.rand(k, generator=rng) + 0.5).to(DEV)
        qr, sr = act_quant_ref(x, 8, inv_s, 0.9)
        for config in (None, dict(ROWS=2, num_warps=8)):  # the default launch; the H100's for K > 4096
            q, s = act_quant(x, 8, inv_s, 0.9, config=config)
            assert (q.int() - qr.int()).abs().max() <= 1 and (q != qr).float().mean() < 1e-4
            torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("m", [37, 4096])
def test_int_gemm_on_gpu_equals_exact_reference(rng, bits, m):
    from quantsparse_kernels.int_gemm import int_gemm, prepare_weight
    from quantsparse_kernels.int_gemm_ref import int_gemm_ref
    from quantsparse_core.dispatch import pack_int4
    k, n = 3072, 1536
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=rng) * 1e-3 + 1e-4
    sw = torch.rand(n, 1, generator=rng) * 1e-3 + 1e-4
    lo = -8 if bits == 4 else -127
    codes = torch.randint(lo, -lo + (bits == 8), (n, k), generator=rng, dtype=torch.int8)
    stored = pack_int4(codes) if bits == 4 else codes
    bias = torch.randn(n, generator=rng)
    w = prepare_weight(stored.to(DEV), bits, sw.to(DEV))
    y = int_gemm(a.to(DEV), sa.to(DEV), w, bias.to(DEV), out_dtype=torch.float32)
    ref = int_gemm_ref(a, sa, stored, sw, bits, bias, torch.float64)
    assert torch.isfinite(y).all() and rel(y.cpu(), ref) < 1e-6


@pytest.mark.parametrize("tile", [None, (256, 128, 128, 8, 3, "store"), (256, 128, 128, 8, 3, "store+subtile+flatten"),
                                  (128, 256, 128, 8, 3, "store+subtile")])
def test_persistent_tma_gemm_on_gpu(rng, tile):
    """The large-M path (M >= TMA_MIN_M, odd M: a partial last row tile), bf16 out as the model runs it,
    default tiles and the TMA-store epilogues, against the exact float64 reference."""
    from quantsparse_kernels.int_gemm import TMA_MIN_M, int_gemm, prepare_weight
    from quantsparse_kernels.int_gemm_ref import int_gemm_ref
    m, k, n = TMA_MIN_M + 1001, 3072, 1280
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=rng) * 1e-3 + 1e-4
    sw = torch.rand(n, 1, generator=rng) * 1e-3 + 1e-4
    codes = torch.randint(-127, 128, (n, k), generator=rng, dtype=torch.int8)
    bias = torch.randn(n, generator=rng)
    w = prepare_weight(codes.to(DEV), 8, sw.to(DEV))
    y = int_gemm(a.to(DEV), sa.to(DEV), w, bias.to(DEV), out_dtype=torch.bfloat16, tma_tile=tile)
    ref = int_gemm_ref(a, sa, codes, sw, 8, bias, torch.float64)
    assert torch.isfinite(y).all() and rel(y.cpu(), ref) < 4e-3  # bf16 output rounding (2^-9 relative)


@pytest.mark.parametrize("m,n,tile", [(37, 1280, None), (8192 + 1001, 1280, None),
                                      (8192 + 1001, 12288, (256, 128, 128, 8, 4, "flatten")),
                                      (8192 + 1001, 3072, (128, 256, 128, 8, 3, "store+subtile+flatten"))])
def test_int_gemm_lora_epilogue_on_gpu(rng, m, n, tile):
    """A LoRA side path (rank 96, bf16, as three stacked rank-32 LoRAs) added in the GEMM's epilogue: the
    pointer kernel, the TMA kernel at its default and its 4-stage fc1 tile (its h / up tiles need shared
    memory beside the stages) and the split TMA store."""
    from quantsparse_kernels import int_gemm as ig
    from quantsparse_kernels.int_gemm_ref import int_gemm_ref
    k, r = 3072, 96
    a = torch.randint(-127, 128, (m, k), generator=rng, dtype=torch.int8)
    sa = torch.rand(m, 1, generator=rng) * 1e-3 + 1e-4
    sw = torch.rand(n, 1, generator=rng) * 1e-3 + 1e-4
    codes = torch.randint(-127, 128, (n, k), generator=rng, dtype=torch.int8)
    h = (torch.randn(m, r, generator=rng) * 0.5).bfloat16()
    up = torch.randn(n, r, generator=rng).bfloat16()
    w = ig.prepare_weight(codes.to(DEV), 8, sw.to(DEV))
    y = ig.int_gemm(a.to(DEV), sa.to(DEV), w, None, out_dtype=torch.bfloat16, tma_tile=tile,
                    lora=(h.to(DEV), up.to(DEV)))
    # float64 on the GPU (exact for these integer sums; the CPU's int64 matmul takes minutes at these sizes)
    plain = int_gemm_ref(a.to(DEV), sa.to(DEV), codes.to(DEV), sw.to(DEV), 8, None, torch.float64)
    ref = plain + h.to(DEV).double() @ up.to(DEV).double().t()
    assert rel(plain, ref) > 0.1 and torch.isfinite(y).all() and rel(y, ref) < 4e-3


def test_low_rank_from_codes_on_gpu_equals_its_integer_math(rng):
    """A LoRA's down projection on a producer's int8 codes at a large token count (the int8 GEMM with
    N = R = 96: the pointer kernel, N being under TMA_MIN_N), then its up projection in the layer's epilogue
    (M over TMA_MIN_M: the TMA kernel), against float64."""
    from quantsparse_core import dispatch
    from quantsparse_core.quant.linear import QuantizedInput, QuantLinear
    from quantsparse_core.quant.low_rank import LowRank
    lin = torch.nn.Linear(3072, 1024)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 3072, generator=rng) * 0.02)
    q = QuantLinear(lin, 4, 8, smooth=True)
    with torch.no_grad():
        q.log_smooth.copy_(torch.randn(3072, generator=rng) * 0.3)
    q = q.freeze().to(DEV)
    lr = LowRank((torch.randn(96, 3072, generator=rng) * 0.02).to(DEV), (torch.randn(1024, 96, generator=rng) * 0.05).to(DEV))
    codes = torch.randint(-127, 128, (9000, 3072), generator=rng, dtype=torch.int8).to(DEV)
    scale = (torch.rand(9000, 1, generator=rng) * 1e-2 + 1e-3).to(DEV)
    qi = QuantizedInput(codes, scale, (1, 9000), torch.float32)   # fp32 out: the term's own error shows
    with dispatch.forced("triton"):
        term = (q(qi, side=lr) - q(qi)).double()
    _, dq, ds, _ = lr._int8
    h = (codes.double() @ dq.double().t()) * scale.double() * ds.double().t()
    exact = h @ lr.up.double().t()
    assert rel(term.reshape(9000, 1024), exact) < 1e-4


@pytest.mark.parametrize("rotation", [None, "hadamard"])
def test_quant_linear_triton_path_on_gpu_equals_torch_path(rng, rotation):
    from quantsparse_core import dispatch
    from quantsparse_core.quant.linear import QuantLinear
    lin = torch.nn.Linear(3072, 1024)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1024, 3072, generator=rng) * 0.02)
    q = QuantLinear(lin, 4, 8, smooth=True, rotation=rotation)
    with torch.no_grad():
        q.log_smooth.copy_(torch.randn(3072, generator=rng) * 0.3)
    q = q.freeze().to(DEV)
    x = torch.randn(2, 2500, 3072, generator=rng).to(DEV)
    with dispatch.forced("torch"):
        ref = q(x)
    with dispatch.forced("triton"):
        got = q(x)
    assert rel(got, ref) < 1e-5
    with torch.inference_mode(), dispatch.forced("triton"):   # as inside ComfyUI
        loaded = QuantLinear.from_packed(3072, 1024, 4, 8, True, rotation, q.packed_tensors(), device=DEV)
        got_inf = loaded(x)
    with dispatch.forced("torch"):
        ref_inf = loaded(x)
    assert rel(got_inf, ref_inf) < 1e-5


@pytest.mark.parametrize("inference,form,tma,lazy", [(False, "dense", False, False), (True, "dense", False, False),
                                                     (False, "int8+factors", False, False),
                                                     (False, "dense", True, False), (True, "int8+factors", True, False),
                                                     (True, "dense", True, True)])
def test_sparse_attention_on_gpu_equals_float64(rng, monkeypatch, inference, form, tma, lazy):
    """inference: ComfyUI runs nodes under torch.inference_mode. form: the SSAR correction as a dense
    tensor, or as the int8 cache keeps it (codes x row scale + rank-16 bf16 factors) for the epilogue.
    tma: the unmasked key tiles by tensor-descriptor loads (Hopper). lazy: lazy rescaling (sparse_attention.LAZY)."""
    import quantsparse_kernels.sparse_attention as sa
    monkeypatch.setattr(sa, "TMA", tma)
    monkeypatch.setattr(sa, "LAZY", lazy)
    from quantsparse_core.dispatch import block_sparse_attention
    from quantsparse_kernels.sparse_attention_ref import dense_masked_attention_f64
    from quantsparse_core.dispatch import Correction
    from quantsparse_core.sparse.layout import temporal_permutation
    from quantsparse_core.sparse.masks import BlockMask, band_keep
    txt, grid, h, d = 77, (5, 12, 20), 4, 128
    length = txt + 5 * 12 * 20                       # 1,277 tokens: a partial last block of 128
    q, k, v = ((torch.randn(1, h, length, d, generator=rng)).to(torch.bfloat16).to(DEV) for _ in range(3))
    if tma:  # v as the single blocks pass it: a view of linear1's wider output rows, beside new q and k
        wide = torch.randn(1, length, 7 * h * d, generator=rng).to(torch.bfloat16).to(DEV)
        wide[..., 2 * h * d:3 * h * d] = v.transpose(1, 2).reshape(1, length, h * d)
        v = wide[..., 2 * h * d:3 * h * d].view(1, length, h, d).transpose(1, 2)
        assert torch.cuda.get_device_capability() < (9, 0) or sa._kv_descriptors(k, v, 128) is not None
    keep = band_keep(length, txt, 0.3, 128).unsqueeze(0).expand(h, -1, -1).clone()
    kinds = ["spatial", "temporal", "temporal", "dense"]
    keep[3] = True
    mask = torch.zeros(1, 1, length)
    mask[..., 60:txt] = float("-inf")                # padded text
    corr = torch.randn(1, length, h * d, generator=rng)
    if form != "dense":
        scale = corr.abs().amax(-1, keepdim=True) / 127
        corr = Correction(codes=torch.round(corr / scale).to(torch.int8), scale=scale,
                          us=torch.randn(1, h, length, 16, generator=rng).to(torch.bfloat16),
                          vh=(torch.randn(1, h, 16, d, generator=rng) * 0.1).to(torch.bfloat16))
    with torch.inference_mode(inference):
        out = block_sparse_attention(q, k, v, mask.to(DEV), BlockMask(keep.clone(), kinds, 128, length), txt, grid,
                                     correction=corr.to(DEV))
    ref = dense_masked_attention_f64(q, k, v, keep, 128, key_bias=mask.reshape(1, length),
                                     perm=temporal_permutation(txt, grid), permuted_heads=[k == "temporal" for k in kinds],
                                     correction=corr)
    assert out.dtype == torch.bfloat16 and rel(out.cpu(), ref) < 1e-2


def test_merged_refresh_attention_on_gpu_equals_float64(rng):
    """The SSAR refresh's O_full and D = O_full - O_sparse from the kernel over the mask and its
    complement (kernels.refresh_attention), bf16 at 1,277 tokens, against float64 dense and sparse."""
    from quantsparse_core.dispatch import refresh_attention
    from quantsparse_kernels.sparse_attention_ref import dense_masked_attention_f64
    from quantsparse_core.sparse.layout import temporal_permutation
    from quantsparse_core.sparse.masks import BlockMask, band_keep
    txt, grid, h, d = 77, (5, 12, 20), 4, 128
    length = txt + 5 * 12 * 20
    q, k, v = ((torch.randn(1, h, length, d, generator=rng)).to(torch.bfloat16).to(DEV) for _ in range(3))
    keep = band_keep(length, txt, 0.3, 128).unsqueeze(0).expand(h, -1, -1).clone()
    keep[3] = True                                   # a dense head: nothing left for the complement
    kinds = ["spatial", "temporal", "temporal", "dense"]
    mask = torch.zeros(1, 1, length)
    mask[..., 60:txt] = float("-inf")
    with torch.inference_mode():
        full, res = refresh_attention(q, k, v, mask.to(DEV), BlockMask(keep.clone(), kinds, 128, length), txt, grid)
    ref = dict(key_bias=mask.reshape(1, length), perm=temporal_permutation(txt, grid),
               permuted_heads=[k == "temporal" for k in kinds])
    full_ref = dense_masked_attention_f64(q, k, v, torch.ones_like(keep), 128, **ref)
    res_ref = full_ref - dense_masked_attention_f64(q, k, v, keep, 128, **ref)
    assert full.dtype == torch.bfloat16 and res.dtype == torch.float32
    assert rel(full.cpu(), full_ref) < 1e-2 and rel(res.cpu(), res_ref) < 2e-2


@pytest.mark.parametrize("placement", ["exact", "gpu-int8"])
def test_host_eigh_on_gpu_matches_inline(rng, placement):
    """SSAR's deferred truncation on CUDA (pinned copy + event, CPU eigh on the worker thread) under
    torch.inference_mode gives the inline result: every output and the final correction."""
    from quantsparse_core.models.attention import AttentionCall, StepInfo
    from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention
    txt, grid, h, d = 16, (4, 8, 8), 2, 64
    length = txt + 256
    sig = torch.linspace(1, 0, 11)
    base = [torch.randn(1, h, length, d, generator=rng) for _ in range(3)]
    xs = [[x.to(DEV) * (1 + 0.1 * i) if j == 2 else x.to(DEV) for j, x in enumerate(base)] for i in range(6)]
    runs = {}
    for host in (False, True):
        fn = SSARAttention(SparseSettings(density=0.3, tau=2, svd_rank=4, warmup_steps=0, warmup_blocks=0, block=64,
                                          n_rows=16, placement=placement, host_eigh=host))
        with torch.inference_mode():
            outs = [fn(*x, None, AttentionCall("double", 0, 1, txt, grid, StepInfo(i, sig))) for i, x in enumerate(xs)]
            runs[host] = [o.float().cpu() for o in outs] + [fn.cache("double", 0, 1)]
    tol = 1e-5 if placement == "exact" else 2e-2  # int8: the pending D2 is held in int8 too
    for a, b in zip(runs[False], runs[True]):
        assert rel(b, a) < tol


def test_producer_quant_on_gpu_equals_reference(rng):
    """kernels.producer_quant at HunyuanVideo widths (C = 3072, GELU 12288, [attention | GELU] 15360),
    bf16, against its PyTorch reference: codes at most one step apart on at most 0.1% of entries."""
    from quantsparse_kernels.producer_quant import gelu_quant, norm_modulate_quant
    from quantsparse_kernels.producer_quant_ref import gelu_quant_ref, norm_modulate_quant_ref
    m, c = 4099, 3072
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x, y = ((torch.randn(1, m, c, generator=rng) * 2).to(**bf) for _ in range(2))
    shift, scale, gate = ((torch.randn(1, 1, c, generator=rng) * 0.3).to(**bf) for _ in range(3))
    lin1 = torch.randn(1, m, 3 * c + 4 * c, generator=rng).to(**bf)
    hid = lin1[..., 3 * c:]                                   # the single block's strided split
    inv = (torch.rand(5 * c, generator=rng) + 0.5).to(DEV)
    xo, *a = norm_modulate_quant(x, shift, scale, inv[:c], 0.9, 8, residual=y, gate=gate)
    xr, *ar = norm_modulate_quant_ref(x, shift, scale, inv[:c], 0.9, 8, residual=y, gate=gate)
    assert rel(xo, xr) < 1e-3
    cases = ((a, ar), (norm_modulate_quant(x, shift, scale, None, 1.0, 8)[1:],
                       norm_modulate_quant_ref(x, shift, scale, None, 1.0, 8)[1:]),
             (gelu_quant(hid, inv[:4 * c], 0.9, 8), gelu_quant_ref(hid, inv[:4 * c], 0.9, 8)),
             (gelu_quant(hid, inv, 0.9, 6, prefix=x), gelu_quant_ref(hid, inv, 0.9, 6, prefix=x)))
    for (codes, s), (rc, rs) in cases:
        diff = (codes.int() - rc.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        assert rel(s, rs) < 2e-4  # a row whose largest entry rounds the other way moves its scale by 2^-8
    for config in (dict(ROWS=1, CHUNK=4096, num_warps=8), dict(ROWS=4, CHUNK=2048, num_warps=8),
                   dict(MATH=0)):                         # tuning launches; the portable GELU forms
        codes, s = gelu_quant(hid, inv, 0.9, 8, prefix=x, config=config)
        rc, rs = gelu_quant_ref(hid, inv, 0.9, 8, prefix=x)
        diff = (codes.int() - rc.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_norm_modulate_quant_on_gpu_at_wan14b_width(rng):
    """The LayerNorm producer at Wan2.1-14B's 5120 channels (one row of an 8192-column block per program), bf16,
    with and without the gated residual: codes at most one step from the reference on at most 0.1% of entries."""
    from quantsparse_kernels.producer_quant import norm_modulate_quant
    from quantsparse_kernels.producer_quant_ref import norm_modulate_quant_ref
    m, c = 2051, 5120
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x, y = ((torch.randn(1, m, c, generator=rng) * 2).to(**bf) for _ in range(2))
    shift, scale, gate = ((torch.randn(1, 1, c, generator=rng) * 0.3).to(**bf) for _ in range(3))
    xo, *a = norm_modulate_quant(x, shift, scale, None, 0.9, 8, residual=y, gate=gate)
    xr, *ar = norm_modulate_quant_ref(x, shift, scale, None, 0.9, 8, residual=y, gate=gate)
    assert rel(xo, xr) < 1e-3
    for (codes, s), (rc, rs) in ((a, ar), (norm_modulate_quant(x, shift, scale, None, 1.0, 8)[1:],
                                           norm_modulate_quant_ref(x, shift, scale, None, 1.0, 8)[1:])):
        diff = (codes.int() - rc.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        assert rel(s, rs) < 2e-4


def test_qk_norm_rope_on_gpu_equals_reference(rng):
    """kernels.qk_norm_rope at HunyuanVideo's widths (24 heads x 128, a 720p-length video stream and
    256 text tokens, batch 2), bf16: within one bf16 unit of the reference (test_kernel_qk_norm_rope.unit_bound).
    A NaN-filled block is freed just before each call, so the caching allocator most likely hands its
    memory to the outputs, and an element the kernel missed fails the finiteness check."""
    from quantsparse_kernels import qk_norm_rope as kern
    from quantsparse_kernels.qk_norm_rope_ref import double_qkv_ref, single_qkv_ref
    from quantsparse_core.models import blocks, fusion, layers
    from test_kernel_qk_norm_rope import unit_bound
    heads, d, lt, li = 24, 128, 256, 33 * 45 * 80 // 4 + 3
    bf = dict(device=DEV, dtype=torch.bfloat16)
    txt = (torch.randn(2, lt, 3 * heads * d, generator=rng) * 2).to(**bf)
    img = (torch.randn(2, li, 3 * heads * d + 64, generator=rng) * 2).to(**bf)[..., 64:]
    ws = [(torch.rand(d, generator=rng) + 0.5).to(**bf) for _ in range(4)]
    pos = torch.cat((torch.zeros(2, lt, 3), torch.randint(0, 80, (2, li, 3), generator=rng).float()), 1)
    table = layers.rope_table(pos.to(DEV), (16, 56, 56), 256.0)
    for got_fn, ref_fn in ((lambda: kern.double_qkv(txt, img, heads, *ws, table),
                            lambda: double_qkv_ref(txt, img, heads, *ws, table)),
                           (lambda: kern.single_qkv(img, heads, ws[0], ws[1], table[:, :, lt:]),
                            lambda: single_qkv_ref(img, heads, ws[0], ws[1], table[:, :, lt:]))):
        poison = torch.full((3, 2, heads, lt + li, d), float("nan"), **bf)
        del poison
        got, ref = got_fn(), ref_fn()
        for g, r in zip(got, ref):
            off = (g.float() - r.float()).abs()
            bound = unit_bound(r, torch.bfloat16)
            assert bool(torch.isfinite(g).all())
            assert bool((off <= bound).all()), float((off / bound).max())
            assert float((off > 0).float().mean()) < 1e-3


def test_wan_qk_norm_rope_on_gpu_equals_reference(rng):
    """kernels.wan_qk_norm_rope at Wan2.1-14B's width (40 heads x 128, whole-width RMSNorm): a 480p x 81-frame token
    grid, batch 1, bf16; and batch 2 with a table per batch entry, fp16, a partial token block. New outputs and in
    place: within one unit of the model dtype of the reference on at most 1e-3 of the entries (rstd may round the
    other way: a sum over 5120 channels in another order). The new outputs' memory was NaN just before the call and
    the in-place ones held the inputs, so a missed element fails either way."""
    from quantsparse_kernels import wan_qk_norm_rope as kern
    from quantsparse_kernels.wan_qk_norm_rope_ref import wan_qk_ref
    from quantsparse_core.models.wan import wan_rope
    from test_kernel_qk_norm_rope import unit_bound
    heads, d = 40, 128
    axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    for b, grid, dtype in ((1, (21, 30, 52), torch.bfloat16), (2, (5, 9, 13), torch.float16)):
        n = grid[0] * grid[1] * grid[2]
        kw = dict(device=DEV, dtype=dtype)
        q, k = ((torch.randn(b, n, heads * d, generator=rng) * 2).to(**kw) for _ in range(2))
        wq, wk = ((torch.rand(heads * d, generator=rng) + 0.5).to(**kw) for _ in range(2))
        table = wan_rope(grid, axes, 10000.0, DEV)
        if b > 1:
            table = torch.cat((table, table.flip(2)))  # another rotation per batch entry
        ref = wan_qk_ref(q, k, heads, wq, wk, table, 1e-6)
        poison = torch.full((2, b, n, heads * d), float("nan"), **kw)
        del poison
        for got in (kern.wan_qk(q, k, heads, wq, wk, table, 1e-6),
                    kern.wan_qk(q.clone(), k.clone(), heads, wq, wk, table, 1e-6, inplace=True)):
            for g, r in zip(got, ref):
                off = (g.float() - r.float()).abs()
                bound = unit_bound(r, dtype)
                assert bool(torch.isfinite(g).all())
                assert bool((off <= bound).all()), float((off / bound).max())
                assert float((off > 0).float().mean()) < 1e-3


@pytest.mark.parametrize("precision,tol", [("int8", 1.5e-2), ("int8-fp8", 5e-2)])
def test_quantized_sparse_attention_on_gpu_equals_quantized_reference(rng, precision, tol):
    """The quantised block-sparse kernel compiled on the GPU (INT8 tensor-core Q.K^T; FP8 e4m3 P.V, which
    the CPU interpreter cannot check) against the float64 quantised reference: mixed head kinds, padded
    text, the SSAR correction in the epilogue, and the merged refresh's O_full and D in that precision."""
    from quantsparse_core.dispatch import block_sparse_attention, refresh_attention
    from quantsparse_kernels.sparse_attention_ref import quantized_sparse_attention_ref
    from quantsparse_core.sparse.layout import temporal_permutation
    from quantsparse_core.sparse.masks import BlockMask, band_keep
    txt, grid, h, d = 77, (5, 12, 20), 4, 128
    length = txt + 5 * 12 * 20
    q, k, v = (torch.randn(1, h, length, d, generator=rng) for _ in range(3))
    # where quantisation moves the result: key magnitudes 16x apart along the sequence, value channels 100x
    # apart, a shared key offset
    k = k * torch.exp2(torch.rand(1, 1, length, 1, generator=rng) * 4) + 2.0 * torch.randn(1, h, 1, d, generator=rng)
    v = v * torch.logspace(0, 2, d)[torch.randperm(d, generator=rng)]
    q, k, v = (x.to(torch.bfloat16).to(DEV) for x in (q, k, v))
    keep = band_keep(length, txt, 0.3, 128).unsqueeze(0).expand(h, -1, -1).clone()
    keep[3] = True
    kinds = ["spatial", "temporal", "temporal", "dense"]
    mask = torch.zeros(1, 1, length)
    mask[..., 60:txt] = float("-inf")
    corr = torch.randn(1, length, h * d, generator=rng) * 0.1
    bm = BlockMask(keep.clone(), kinds, 128, length)
    index, count = bm.to_indices()
    kw = dict(block=128, key_bias=mask.reshape(1, length), perm=temporal_permutation(txt, grid),
              permuted_heads=[x == "temporal" for x in kinds])
    with torch.inference_mode():
        out = block_sparse_attention(q, k, v, mask.to(DEV), bm, txt, grid, correction=corr.to(DEV), precision=precision)
        full, res = refresh_attention(q, k, v, mask.to(DEV), bm, txt, grid, precision=precision)
    qc, kc, vc = (x.cpu() for x in (q, k, v))
    ref = quantized_sparse_attention_ref(qc, kc, vc, index, count, precision=precision, correction=corr, **kw).double()
    assert out.dtype == torch.bfloat16 and rel(out.cpu(), ref) < tol
    with torch.inference_mode():  # the bf16 kernel is much further from the quantised reference: it really quantises
        plain = block_sparse_attention(q, k, v, mask.to(DEV), bm, txt, grid, correction=corr.to(DEV))
    assert rel(out.cpu(), ref) < 0.6 * rel(plain.cpu(), ref)
    n = -(-length // 128)
    all_index = torch.arange(n, dtype=torch.int32).expand(h, n, n).contiguous()
    full_ref = quantized_sparse_attention_ref(qc, kc, vc, all_index, torch.full((h, n), n, dtype=torch.int32),
                                              precision=precision, **kw).double()
    sparse_ref = quantized_sparse_attention_ref(qc, kc, vc, index, count, precision=precision, **kw).double()
    assert rel(full.cpu(), full_ref) < tol and rel(res.cpu(), full_ref - sparse_ref) < 2 * tol


def test_int8_dense_attention_on_gpu_equals_reference(rng):
    """The dense INT8 kernel compiled on the GPU (INT8 tensor-core Q.K^T, bf16 P.V) against its PyTorch
    reference: a partial last key tile, a shared key offset, value channels 100x apart. The kernel rounds P
    against the running row maximum and the reference against the final one, so they differ by less than the
    reference differs from exact attention; the log-sum-exp sums the unrounded P."""
    from quantsparse_kernels.int8_attention import int8_attention
    from quantsparse_kernels.int8_attention_ref import exact_attention_f64, int8_attention_ref
    b, h, length, d = 1, 4, 2053, 128
    q, k, v = (torch.randn(b, length, h, d, generator=rng) for _ in range(3))
    k = k + 2.0 * torch.randn(b, 1, h, d, generator=rng)
    v = v * torch.logspace(0, 2, d)[torch.randperm(d, generator=rng)]
    q, k, v = (x.to(torch.bfloat16).to(DEV).transpose(1, 2) for x in (q, k, v))
    lse = torch.empty(b, h, length, device=DEV)
    with torch.inference_mode():
        out = int8_attention(q, k, v, lse=lse)
        ref, lse_ref = int8_attention_ref(q, k, v, return_lse=True)
    exact = exact_attention_f64(q, k, v)
    quant_err = rel(ref.cpu(), exact)
    assert rel(out.cpu(), exact) < 2e-2, rel(out.cpu(), exact)
    assert rel(out.cpu(), ref.cpu()) < 0.5 * quant_err, (rel(out.cpu(), ref.cpu()), quant_err)
    gap = (lse - lse_ref).abs()
    worst = divmod(int(gap.argmax()), length)
    assert float(gap.max()) < 1e-3, (f"LSE max gap {float(gap.max()):.2e} at (head, row) {worst}; "
                                     f"rows over 1e-4: {int((gap > 1e-4).sum())} of {gap.numel()}")


def test_refresh_residuals_on_gpu_equal_reference_bit_for_bit(rng):
    """kernels.residual compiled on the GPU at a 544p-like row width: D (bf16, rounded to nearest even
    as torch rounds) and D2 (fp32) equal the PyTorch reference exactly."""
    from quantsparse_kernels.residual import refresh_residuals
    from quantsparse_kernels.residual_ref import refresh_residuals_ref
    shape = (1, 4099, 3072)
    full, sparse = (torch.randn(shape, generator=rng).to(torch.bfloat16).to(DEV) for _ in range(2))
    prev = (torch.randn(shape, generator=rng) * 0.1).to(torch.bfloat16).to(DEV)
    d, d2 = refresh_residuals(full, sparse, prev)
    rd, rd2 = refresh_residuals_ref(full, sparse, prev)
    assert torch.equal(d, rd) and torch.equal(d2, rd2)


def test_int8_rows_on_gpu_equal_reference_bit_for_bit(rng):
    """kernels.residual.int8_residuals compiled on the GPU at HunyuanVideo's row width (3072): the codes, row
    scales and drift equal the PyTorch reference exactly (IEEE division, no contracted multiply-adds)."""
    from quantsparse_kernels.residual import int8_residuals
    from quantsparse_kernels.residual_ref import int8_residuals_ref
    shape = (1, 4099, 3072)
    full, sparse = (torch.randn(shape, generator=rng).to(torch.bfloat16).to(DEV) for _ in range(2))
    sparse[0, 7] = full[0, 7]                 # a zero row: the tiny floor, a subnormal scale (no flush to zero)
    full[0, 8], sparse[0, 8] = torch.tensor([127.0, 2.5, -2.5, 3.5] * 768, dtype=torch.bfloat16), 0  # exact halves
    codes, scale, _ = int8_residuals_ref((torch.randn(shape, generator=rng) * 0.1).to(DEV))
    got = int8_residuals(full, sparse, codes, scale)
    ref = int8_residuals_ref(full, sparse, codes, scale)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))

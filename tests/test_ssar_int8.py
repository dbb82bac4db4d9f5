"""INT8 dense passes inside SSAR (SparseSettings.int8_attention): dense warm-up steps, the dense first blocks
and a refresh's full output run dispatch.int8_dense_attention; the refresh residual D = O_full - O_sparse
stays the residual (quantization noise is a small part of it); other masks and calls outside a run stay on
SDPA. CPU, float32: the INT8 arithmetic is the kernel's PyTorch reference (kernels/int8_attention_ref.py)."""
import torch
import torch.nn.functional as F

from quantsparse_core.dispatch import block_sparse_attention, int8_dense_attention
from quantsparse_core.models.attention import AttentionCall, StepInfo, dense_attention
from quantsparse_core.models.hunyuan_video import TEXT_MASK_FLOOR
from quantsparse_core.sparse.ssar import SparseSettings, SSARAttention

H, D, TXT, GRID = 2, 64, 16, (4, 8, 8)
N = TXT + GRID[0] * GRID[1] * GRID[2]
SIGMAS = torch.linspace(1, 0, 11)


def structured(rng, scale):
    """Tokens with a shared low-rank component (attention with structure, as a video DiT's has) plus noise."""
    basis = torch.randn(N, 8, generator=rng) @ torch.randn(8, H * D, generator=rng)
    x = basis + 0.5 * torch.randn(N, H * D, generator=rng)
    return (scale * x).view(1, N, H, D).transpose(1, 2).contiguous()


def qkv(rng, scale=0.6):
    return structured(rng, scale), structured(rng, scale), torch.randn(1, H, N, D, generator=rng)


def padding_mask(pad=5):
    """[B, 1, L] additive key mask blocking the last `pad` text tokens, as HunyuanVideoDiT builds it."""
    m = torch.zeros(1, 1, N)
    m[:, 0, TXT - pad:TXT] = TEXT_MASK_FLOOR
    return m


def settings(**kw):
    base = dict(density=0.15, warmup_blocks=0, block=16, n_rows=32, placement="exact", schedule="standard")
    base.update(kw)
    return SparseSettings(**base)


def call(step, index=0):
    return AttentionCall("double", index, 2, TXT, GRID, None if step is None else StepInfo(step, SIGMAS))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_dense_steps_and_first_blocks_run_int8(rng):
    q, k, v = qkv(rng)
    mask = padding_mask()
    a = SSARAttention(settings(int8_attention=True, warmup_blocks=1))
    want = int8_dense_attention(q, k, v, mask)
    assert torch.equal(a(q, k, v, mask, call(0)), want)            # step 0: dense warm-up
    assert torch.equal(a(q, k, v, mask, call(5, index=0)), want)   # block 0 of a later step: a dense first block
    assert a.stats["int8_dense"] == 2
    sdpa = dense_attention(q, k, v, mask, call(0))
    assert 0 < rel(want, sdpa) < 0.05  # the INT8 path ran (not SDPA), within INT8's rounding


def test_refresh_residual_is_not_dominated_by_int8_noise(rng):
    q, k, v = qkv(rng)
    mask = padding_mask()
    out = {}
    for int8 in (False, True):
        a = SSARAttention(settings(int8_attention=int8))
        c = call(2)
        block_mask = a._new_mask(q, k, v, mask, c)
        out[int8] = a._refresh_outputs(q, k, v, mask, block_mask, c, None, False)[:2]
        masks = block_mask
        if int8:
            assert a.stats["int8_dense"] == 1
    (full, d), (full8, d8) = out[False], out[True]
    noise_full, noise_d = rel(full8, full), rel(d8, d)
    print(f"INT8 vs bf16-path: O_full {noise_full:.3%}, residual D {noise_d:.3%}, |D| / |O_full| "
          f"{float(d.norm() / full.norm()):.2f}")
    assert 0 < noise_full < 0.05
    assert noise_d < 0.05  # the residual SSAR reuses is the sparse operator's error, not INT8 rounding
    # D is the INT8 full output minus the (bf16-path) sparse pass under the same mask
    sparse = block_sparse_attention(q, k, v, mask, masks, TXT, GRID)
    torch.testing.assert_close(d8, full8.float() - sparse.float(), rtol=0, atol=1e-6)


def test_other_masks_and_calls_outside_a_run_stay_on_sdpa(rng):
    q, k, v = qkv(rng)
    a = SSARAttention(settings(int8_attention=True))
    query_mask = torch.zeros(1, 1, N, N)
    query_mask[..., :N // 2, -3:] = TEXT_MASK_FLOOR  # depends on the query: not key padding
    assert torch.equal(a(q, k, v, query_mask, call(0)), dense_attention(q, k, v, query_mask, call(0)))
    assert torch.equal(a(q, k, v, None, call(None)), dense_attention(q, k, v, None, call(None)))
    assert a.stats["int8_dense"] == 0
    assert SparseSettings().int8_attention is False  # off until measured faster on the GPU in the product path


def host_call(step, dense, index=0):
    return AttentionCall("double", index, 2, TXT, GRID, StepInfo(step, SIGMAS), dense=dense)


def test_host_attention_serves_the_dense_passes_and_the_refresh_full_output(rng):
    """host_attention: dense warm-up steps, dense first blocks and a refresh's full output come from the call's
    host attention (ComfyUI's configured one, here our INT8 reference standing in for comfy kitchen's); the
    residual is that output minus the sparse pass; reuse steps never call it; without the setting (or without
    a host function) the run's own dense path serves, and host_attention wins over int8_attention and
    merged_refresh."""
    q, k, v = qkv(rng)
    mask = padding_mask()
    calls = []

    def host(q_, k_, v_, m_):
        calls.append((m_, k_.shape[2], v_.shape[2]))
        return int8_dense_attention(q_, k_, v_, m_)
    kept = (mask[0, 0] == 0).nonzero().flatten()  # the padded text keys are left out, the mask dropped
    want = int8_dense_attention(q, k[:, :, kept], v[:, :, kept])
    a = SSARAttention(settings(host_attention=True, int8_attention=True, merged_refresh=True, warmup_blocks=1,
                               warmup_steps=1, tau=2))
    assert torch.equal(a(q, k, v, mask, host_call(0, host)), want)            # dense warm-up step
    assert torch.equal(a(q, k, v, mask, host_call(1, host, index=0)), want)   # dense first block
    assert calls == [(None, N - 5, N - 5)] * 2
    c = host_call(1, host, index=1)                                          # first sparse-phase step: a refresh
    full = a(q, k, v, mask, c)
    assert len(calls) == 3 and torch.equal(full, want) and a.stats["host_dense"] == 3
    assert a.stats["refresh_sparse"] > 0  # full output + a sparse pass, not the merged kernel
    sparse = block_sparse_attention(q, k, v, mask, a._states[("double", 1, 1)].mask, TXT, GRID)
    d = a._store_for(q).get((("double", 1, 1), "D"), q.device)  # placement "exact": stored as computed
    torch.testing.assert_close(d.float().reshape(sparse.shape), want.float() - sparse.float(), rtol=0, atol=1e-6)
    a(q, k, v, mask, host_call(2, host, index=1))                            # reuse: sparse + correction only
    assert len(calls) == 3
    plain = SSARAttention(settings(int8_attention=False, warmup_blocks=1))
    assert torch.equal(plain(q, k, v, mask, host_call(0, host)), dense_attention(q, k, v, mask, call(0)))
    no_host = SSARAttention(settings(host_attention=True, warmup_blocks=1))
    assert torch.equal(no_host(q, k, v, mask, call(0)), dense_attention(q, k, v, mask, call(0)))
    assert len(calls) == 3 and SparseSettings().host_attention is False


def test_host_attention_gets_padded_keys_left_out_not_the_mask(rng):
    """A key-padding mask reaches the host attention as those keys left out and no mask (its unmasked kernel:
    a 544p HunyuanVideo step with comfy kitchen's INT8 attention and the mask took 1.55x as long as with ComfyUI's
    default SDPA on an H100), with the
    same output as the masked attention (float64 host: exact); any other mask is handed over as it is."""
    q, k, v = (t.double() for t in qkv(rng))
    pad = int(torch.randint(1, TXT - 1, (1,), generator=rng))
    mask = padding_mask(pad=pad)
    seen = []

    def host(q_, k_, v_, m_):
        seen.append((m_, k_.shape[2]))
        return dense_attention(q_, k_, v_, m_, call(0))
    a = SSARAttention(settings(host_attention=True, warmup_steps=1))
    got = a(q, k, v, mask.double(), host_call(0, host))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.double().unsqueeze(1))  # the mask applied as is
    torch.testing.assert_close(got, masked.transpose(1, 2).reshape(got.shape), rtol=0, atol=1e-12)
    assert seen == [(None, int((mask == 0).sum()))]
    rows = torch.zeros(1, 1, N, N, dtype=torch.float64)  # query-dependent: not key padding
    rows[0, 0, :TXT, TXT:] = TEXT_MASK_FLOOR
    a(q, k, v, rows, host_call(0, host))
    assert seen[-1][0] is rows and seen[-1][1] == N
    other = 2 if pad != 2 else 3  # padded differently from row 0 (equal rows would be one key set to leave out)
    two = torch.cat([mask, padding_mask(pad=other)]).double()  # batch rows padded differently: handed over as is
    a(*(t.expand(2, -1, -1, -1) for t in (q, k, v)), two, host_call(0, host))
    assert seen[-1][0] is two and seen[-1][1] == N

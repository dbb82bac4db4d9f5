"""Sparse VideoGen (SVG) block masks: a diagonal band of 128-token blocks, per head either in the
original frame-major order ("spatial": neighbours within about one frame) or in the temporal order
("temporal": the same spatial position across frames). Text rows and columns are always kept.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from .. import dispatch
from .layout import check_layout, inverse_permutation, temporal_permutation

BLOCK = 128
KINDS = ("spatial", "temporal", "dense")


def check_density(density: float) -> float:
    """Density is the kept fraction of attention; 0 would keep nothing and >1 is meaningless."""
    d = float(density)
    if not (0.0 < d <= 1.0) or math.isnan(d):
        raise ValueError(f"density {density!r} is outside the range (0, 1]: it is the kept fraction of attention")
    return d


def block_sizes(seq_len: int, block: int) -> torch.Tensor:
    """Real token count of each block; the last block may be partial."""
    n = -(-seq_len // block)
    sizes = torch.full((n,), block, dtype=torch.float64)
    sizes[-1] = seq_len - (n - 1) * block
    return sizes


def text_blocks(txt_len: int, block: int) -> int:
    """Number of leading blocks that hold at least one text token."""
    return -(-txt_len // block)


@dataclass
class BlockMask:
    """Which key blocks each query block visits, per head, in that head's own token order.

    keep: [H, nq, nk] bool. kinds[h]: "spatial" (original order), "temporal" (q/k/v are permuted to
    the temporal order before the mask applies) or "dense". errors: optional [H, 2] sampled MSE of
    the spatial and temporal masks, kept for diagnostics. known: (kv_index, kv_count, density) already
    computed for this `keep` (svg_masks shares them between the layers whose band is the same), so
    that to_indices() and density() need no GPU work and no host sync. Masks are never modified in
    place: those from svg_masks view one shared band.
    """
    keep: torch.Tensor
    kinds: List[str]
    block: int
    seq_len: int
    errors: Optional[torch.Tensor] = None
    # Not an init field: dataclasses.replace(mask, keep=...) starts without it; set by svg_masks only.
    known: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = field(default=None, init=False, repr=False,
                                                                      compare=False)

    def __post_init__(self):
        n = -(-self.seq_len // self.block)
        if self.keep.dtype != torch.bool or self.keep.ndim != 3 or tuple(self.keep.shape[1:]) != (n, n):
            raise ValueError(f"keep must be bool [H, {n}, {n}] for seq_len {self.seq_len} and block {self.block}, "
                             f"got {self.keep.dtype} {tuple(self.keep.shape)}")
        if len(self.kinds) != self.keep.shape[0] or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"kinds must name one of {KINDS} for each of {self.keep.shape[0]} heads, got {self.kinds}")

    @property
    def num_heads(self) -> int:
        return self.keep.shape[0]

    def permuted(self, head: int) -> bool:
        """Whether this head's q/k/v must be put in temporal order before the mask applies."""
        return self.kinds[head] == "temporal"

    def head_density(self) -> torch.Tensor:
        """[H] fraction of (query token, key token) pairs kept, partial blocks counted by real size."""
        sizes = block_sizes(self.seq_len, self.block).to(self.keep.device)
        pairs = sizes[:, None] * sizes[None, :]
        return (self.keep.double() * pairs).sum((1, 2)) / float(self.seq_len) ** 2

    def density(self) -> float:
        """Mean kept fraction over heads."""
        if self.known is not None:
            return self.known[2]
        return float(self.head_density().mean())

    def to_indices(self, full_width: bool = False):
        """(kv_index [H, nq, max_k] int32, ascending, padded with -1; kv_count [H, nq] int32). full_width:
        max_k = every key block instead of the longest row, which is then not read back from the mask's
        device (a host sync)."""
        if self.known is not None:
            return self.known[0], self.known[1]
        nk = self.keep.shape[-1]
        cols = torch.arange(nk, device=self.keep.device)
        order = torch.where(self.keep, cols, cols + nk).sort(dim=-1).values
        count = self.keep.sum(-1)
        max_k = nk if full_width else max(int(count.max()), 1)
        index = order[..., :max_k]
        index = torch.where(index < nk, index, torch.full_like(index, -1))
        return index.to(torch.int32), count.to(torch.int32)


def dense_block_mask(num_heads: int, seq_len: int, block: int = BLOCK) -> BlockMask:
    """Every head visits every key block (density 1)."""
    n = -(-seq_len // block)
    return BlockMask(torch.ones(num_heads, n, n, dtype=torch.bool), ["dense"] * num_heads, block, seq_len)


def band_width_tokens(density: float, seq_len: int, txt_len: int) -> float:
    """METHOD.md §3: half-width (tokens) of a diagonal band that, with the text rows and columns,
    keeps about `density` of an N x N attention map."""
    n = float(seq_len)
    s = (check_density(density) * n * n - 2.0 * n * txt_len) / (n * n)
    s = min(max(s, 0.0), 1.0)
    return n * (1.0 - math.sqrt(1.0 - s))


def _van_der_corput(k: torch.Tensor) -> torch.Tensor:
    """Base-2 radical inverse: any prefix of 0, 1, 2, ... maps to well-spread points in [0, 1)."""
    out = torch.zeros(k.shape, dtype=torch.float64)
    scale = 0.5
    k = k.clone()
    while bool((k > 0).any()):
        out += (k & 1).double() * scale
        k >>= 1
        scale /= 2
    return out


def band_keep(seq_len: int, txt_len: int, density: float, block: int = BLOCK) -> torch.Tensor:
    """[n, n] bool band of blocks whose realized density (text rows/columns kept) is closest to `density`.

    The band is |i - j| <= w plus part of diagonal w + 1 (pairs spread evenly along it), because whole
    diagonals are too coarse at realistic sizes (one diagonal of 17 blocks is ~6% of the map).
    Requests below the minimum (diagonal + text) give that minimum.
    """
    d = check_density(density)
    n = -(-seq_len // block)
    if d >= 1.0:
        return torch.ones(n, n, dtype=torch.bool)
    sizes = block_sizes(seq_len, block)
    nt = text_blocks(txt_len, block)
    keep = torch.eye(n, dtype=torch.bool)
    keep[:nt, :] = True
    keep[:, :nt] = True
    base = float((keep.double() * sizes[:, None] * sizes[None, :]).sum())
    # Candidate symmetric pairs (i, j > i) outside the text rows, ordered by diagonal, spread within it.
    i, j = torch.triu_indices(n, n, offset=1)
    sel = i >= nt
    i, j = i[sel], j[sel]
    off = j - i
    key = off.double() + _van_der_corput(i - nt)
    order = torch.argsort(key, stable=True)
    i, j = i[order], j[order]
    gain = 2.0 * sizes[i] * sizes[j]
    realized = torch.cat([torch.tensor([base], dtype=torch.float64), base + gain.cumsum(0)]) / float(seq_len) ** 2
    p = int(torch.argmin((realized - d).abs()))
    keep[i[:p], j[:p]] = True
    keep[j[:p], i[:p]] = True
    return keep


def key_bias(mask: Optional[torch.Tensor], batch: int, seq_len: int) -> Optional[torch.Tensor]:
    """Additive key mask ([B|1, 1, L], [B|1, 1, 1, L] or [B|1, L]) as [B, L]; query-dependent masks are refused."""
    if mask is None:
        return None
    if mask.shape[-1] != seq_len or any(s != 1 for s in mask.shape[1:-1]) or mask.shape[0] not in (1, batch):
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not an additive key mask [B, 1, {seq_len}]")
    return mask.reshape(mask.shape[0], seq_len).expand(batch, seq_len)


def masked_attention(scores: torch.Tensor, allowed: Optional[torch.Tensor], v: torch.Tensor,
                     matmul=torch.matmul) -> torch.Tensor:
    """softmax(scores restricted to `allowed`) @ v; a row with nothing allowed gives 0, not NaN."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    p = torch.exp(scores - top)
    denom = p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return matmul(p, v) / denom


def split_k_matmul(p: torch.Tensor, v: torch.Tensor, piece: int = 4096) -> torch.Tensor:
    """p [..., n, L] @ v [..., L, D] with the long L cut into pieces whose products are summed.

    SVG's sampled rows give a 64 x 128 output per head reduced over L ~ 10^5 keys; as one batched
    GEMM that runs on a handful of SMs, as pieces it is a batch of many small GEMMs that fills the
    GPU (svg_masks at 720p on an H100: 54.5 ms per layer with one GEMM, 27.5 ms with pieces)."""
    length = p.shape[-1]
    if length <= 2 * piece:
        return p @ v
    pieces = -(-length // piece)
    pad = pieces * piece - length
    if pad:  # zero weights on zero rows: the padded keys add nothing
        p = torch.nn.functional.pad(p, (0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    pp = p.unflatten(-1, (pieces, piece)).transpose(-3, -2)   # [..., pieces, n, piece]
    vv = v.unflatten(-2, (pieces, piece))                    # [..., pieces, piece, D]
    return (pp @ vv).sum(-3)


def sample_rows(heads: int, txt_len: int, n_video: int, n: int, generator=None) -> torch.Tensor:
    """[heads, n] distinct video query rows per head, stratified: one uniformly random row in each of
    n equal slices of the video rows. O(heads * n) work (an argsort of every row cost ~0.14 s per
    720p layer on the host) and even coverage of the frames."""
    n = min(n, n_video)
    edges = torch.div(torch.arange(n + 1, dtype=torch.int64) * n_video, n, rounding_mode="floor")
    u = torch.rand(heads, n, generator=generator, dtype=torch.float64)
    width = (edges[1:] - edges[:-1]).double()
    return edges[:-1] + (u * width).long().clamp_max((width - 1).long()) + txt_len


@functools.lru_cache(maxsize=16)
def _cached_band(seq_len: int, txt_len: int, density: float, block: int) -> torch.Tensor:
    return band_keep(seq_len, txt_len, density, block)


@functools.lru_cache(maxsize=16)
def _band_for_heads(seq_len: int, txt_len: int, density: float, block: int, heads: int, device: str):
    """(keep [H, n, n] (one band, expanded), kv_index, kv_count, density) on `device`, computed once.
    Every refresh of every layer uses the same band (only the heads' kinds differ), so its upload,
    index sort and density (each a host sync) run once instead of per layer and step."""
    keep = _cached_band(seq_len, txt_len, density, block).to(device).unsqueeze(0).expand(heads, -1, -1)
    proto = BlockMask(keep, ["spatial"] * heads, block, seq_len)
    index, count = proto.to_indices()
    return keep, index.contiguous(), count.contiguous(), proto.density()


HEAD_CHUNK_ELEMENTS = 1 << 26  # float32 score elements per head chunk (256 MB): bounds svg_masks' memory


def svg_masks(q, k, v, mask, txt_len: int, grid, density: float, n_rows: int = 64, block: int = BLOCK,
              generator: Optional[torch.Generator] = None) -> BlockMask:
    """Per head, pick the spatial or temporal band by sampled error (SVG's online profiling).

    q, k, v: [B, H, L, D]; mask: additive key mask or None. For `n_rows` sampled video query rows
    per head, compare exact attention against all keys with attention restricted to the keys each
    mask lets the row's query block visit; keep the mask with lower mean squared error. The errors
    come from kernels.svg_profile where quantsparse_core.dispatch picks Triton, else from the PyTorch path
    (heads in chunks); either way one host sync at the end (a per-head loop synced 48 times per layer).
    """
    d = check_density(density)
    b, heads, seq_len, _ = q.shape
    check_layout(seq_len, txt_len, grid)
    if d >= 1.0:
        return dense_block_mask(heads, seq_len, block)
    keep, index, count, realized = _band_for_heads(seq_len, txt_len, d, block, heads, str(q.device))
    band = keep[0]
    rows = sample_rows(heads, txt_len, seq_len - txt_len, n_rows, generator)
    if q.is_cuda:  # a pageable copy would make the host wait for the GPU queue
        rows = rows.pin_memory()
    rows = rows.to(q.device, non_blocking=True)
    inv = inverse_permutation(temporal_permutation(txt_len, grid, device=q.device))
    bias = key_bias(mask, b, seq_len)
    kernel = dispatch.svg_profile_kernel(q, k, v, block)
    if kernel is not None:
        errors = kernel(q, k, v, rows, band, inv, block, None if bias is None else bias.to(q.device))
    else:
        errors = _svg_errors_torch(q, k, v, rows, band, inv, block, bias)
    errors = errors.cpu()
    kinds = ["spatial" if float(e[0]) <= float(e[1]) else "temporal" for e in errors]
    result = BlockMask(keep, kinds, block, seq_len, errors)
    result.known = (index, count, realized)
    return result


def _svg_errors_torch(q, k, v, rows, band, inv, block: int, bias) -> torch.Tensor:
    """[H, 2] sampled-row MSE of the spatial / temporal band vs exact attention, in chunks of heads
    whose fp32 scores fit HEAD_CHUNK_ELEMENTS. No host sync."""
    b, heads, seq_len, dim = q.shape
    n = rows.shape[1]
    kb_spatial = torch.arange(seq_len, device=q.device) // block
    kb_temporal = inv // block
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    errors = torch.zeros(heads, 2, dtype=torch.float64, device=q.device)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // max(1, b * n * seq_len))
    for h0 in range(0, heads, chunk):
        r = rows[h0:h0 + chunk]  # [hc, n]
        hc = r.shape[0]
        qr = q[:, h0:h0 + hc].gather(2, r[None, :, :, None].expand(b, hc, n, dim)).to(dtype)
        scores = (qr @ k[:, h0:h0 + hc].to(dtype).transpose(-1, -2)) / math.sqrt(dim)  # [B, hc, n, L]
        if bias is not None:
            scores = scores + bias[:, None, None, :].to(dtype)
        vh = v[:, h0:h0 + hc].to(dtype)
        exact = masked_attention(scores, None, vh, split_k_matmul)
        for c, kb in enumerate((kb_spatial, kb_temporal)):
            allowed = band[kb[r]][..., kb]  # [hc, n, L]: keys the row's query block may visit
            errors[h0:h0 + hc, c] = ((masked_attention(scores, allowed, vh, split_k_matmul) - exact) ** 2).mean((0, 2, 3)).double()
    return errors

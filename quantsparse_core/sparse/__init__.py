"""Sparse attention: SVG block masks (spatial / temporal per head), block-sparse attention (the fast path
where it can be: quantsparse_core.dispatch), SSAR with its residual cache and rank-r truncation."""
from .layout import check_layout, inverse_permutation, temporal_permutation
from .masks import BLOCK, BlockMask, band_keep, band_width_tokens, check_density, dense_block_mask, svg_masks
from ..dispatch import block_sparse_attention
from .ssar import SparseSettings, SSARAttention

__all__ = [
    "BLOCK", "BlockMask", "band_keep", "band_width_tokens", "block_sparse_attention", "check_density",
    "check_layout", "dense_block_mask", "inverse_permutation", "svg_masks", "temporal_permutation", "SparseSettings",
    "SSARAttention",
]

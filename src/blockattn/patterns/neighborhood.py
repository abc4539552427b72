"""Neighborhood attention on 1D/2D/3D token grids (NATTEN / Faster NA / Generalized NA).

Hassani et al., "Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the
Threadblock Level" (arXiv 2403.04690) and "Generalized Neighborhood Attention: Multi-dimensional
Sparse Attention at the Speed of Light" (arXiv 2504.16922).

Rule, per grid axis of size n with window K, dilation d, stride s:
- a token only sees keys of its own dilation group (`key % d == query % d`); inside the group
  (length m = number of coordinates with that residue) coordinates are divided by d;
- non-causal: queries are grouped by `stride`, and every query of a group uses the window of its
  group leader (the centre query, the right one of the two for even strides); the window is the
  K keys around the leader (K//2 left, K-1-K//2 right), shifted inwards at the borders so it always
  holds exactly K keys (NATTEN's border rule; windows are not truncated);
- causal: the leader is the last query of the stride group; a query sees keys `j <= i` with
  `leader - j < K`.
A key is kept when every axis keeps it. `stride=1, dilation=1` is plain neighborhood attention;
`stride=window` is blocked attention.

Token order: row-major (default), or GNA's tiled order when `tile_shape` is given: tokens are
grouped tile by tile, so a query block of `prod(tile_shape)` tokens is one spatial tile and the
layout becomes (nearly) block-sparse. `to_tiled` / `from_tiled` move q, k, v in and out of it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.patterns._grid import check_grid, check_tile_shape, grid_interval_layout, per_axis, token_coords

__all__ = ["neighborhood", "neighborhood_ranges", "tiled_permutation", "to_tiled", "from_tiled"]


def _check_na_args(grid, window, dilation, stride, causal):
    grid = check_grid(grid)
    ndim = len(grid)
    window = per_axis("window", window, ndim)
    dilation = per_axis("dilation", dilation, ndim)
    stride = per_axis("stride", stride, ndim)
    causal = per_axis("causal", causal, ndim, kind=bool)
    for axis, (n, k, d, s) in enumerate(zip(grid, window, dilation, stride)):
        if k * d > n:
            raise ValueError(f"window * dilation must not exceed the grid size on every axis; axis {axis}: "
                             f"window={k}, dilation={d}, size={n}")
        if s > k:
            raise ValueError(f"stride must not exceed window on every axis; axis {axis}: stride={s}, window={k}")
    return grid, window, dilation, stride, causal


def neighborhood_ranges(size: int, window: int, dilation: int = 1, stride: int = 1,
                        causal: bool = False) -> tuple[Tensor, Tensor]:
    """Per coordinate x of one axis, the first and last key coordinate it may see (long `[size]` each);
    the keys are those in `[lo, hi]` with `key % dilation == x % dilation`."""
    x = torch.arange(size)
    group = x % dilation
    xi = x // dilation
    group_len = (size - group + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((xi // stride) * stride + stride - 1, group_len - 1)
        lo_g, hi_g = (leader - window + 1).clamp(min=0), xi
    else:
        left = window // 2
        right = window - 1 - left
        leader = torch.minimum((xi // stride) * stride + stride // 2, group_len - 1)
        centre = torch.maximum(torch.minimum(leader, group_len - 1 - right), torch.full_like(leader, left))
        lo_g, hi_g = centre - left, centre + right
    return lo_g * dilation + group, hi_g * dilation + group


def neighborhood(grid, *, window, dilation=1, stride=1, causal=False, block_q: int = 64, block_k: int = 64,
                 tile_shape=None) -> BlockLayout:
    """Neighborhood attention over a token grid `(L,)`, `(H, W)` or `(T, H, W)` (see the module docstring).

    Args:
        grid: grid shape; the sequence has `prod(grid)` tokens.
        window, dilation, stride: ints or per-axis tuples (`window * dilation <= size`, `stride <= window`).
        causal: bool or per-axis tuple of bools.
        block_q, block_k: tile sizes in tokens.
        tile_shape: None for row-major token order; a per-axis tile shape for GNA's tiled order (it
            must divide the grid, and `block_q` and `block_k` must equal `prod(tile_shape)`).
    """
    grid, window, dilation, stride, causal = _check_na_args(grid, window, dilation, stride, causal)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid)
    if tile_shape is not None and (block_q, block_k) != (math.prod(tile_shape),) * 2:
        raise ValueError(f"with tile_shape={tile_shape}, block_q and block_k must equal prod(tile_shape)="
                         f"{math.prod(tile_shape)}, got block_q={block_q}, block_k={block_k}")
    lo, hi = zip(*(neighborhood_ranges(n, k, d, s, c) for n, k, d, s, c in zip(grid, window, dilation, stride, causal)))
    return grid_interval_layout(grid, [x[None] for x in lo], [x[None] for x in hi], dilation,
                                tile_shape=tile_shape, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------- tiled token order
def tiled_permutation(grid, tile_shape) -> Tensor:
    """long `[L]`: `perm[t]` is the row-major index of the token at position t of the tiled order."""
    grid = check_grid(grid)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid)
    if tile_shape is None:
        raise ValueError("tile_shape must be given for the tiled order")
    coords = token_coords(grid, tile_shape)
    index = torch.zeros(len(coords), dtype=torch.long)
    for axis, n in enumerate(grid):
        index = index * n + coords[:, axis]
    return index


def to_tiled(x: Tensor, grid, tile_shape, *, dim: int = -2) -> Tensor:
    """Reorder the token dimension `dim` of `x` (e.g. `[B, H, L, D]`) from row-major to tiled order."""
    perm = tiled_permutation(grid, tile_shape)
    _check_token_dim(x, dim, len(perm))
    return x.index_select(dim, perm.to(x.device))


def from_tiled(x: Tensor, grid, tile_shape, *, dim: int = -2) -> Tensor:
    """Inverse of `to_tiled`: tiled order back to row-major."""
    perm = tiled_permutation(grid, tile_shape)
    _check_token_dim(x, dim, len(perm))
    return x.index_select(dim, torch.argsort(perm).to(x.device))


def _check_token_dim(x, dim, length):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.shape[dim] != length:
        raise ValueError(f"x must have prod(grid)={length} tokens along dim {dim}, got shape {list(x.shape)}")

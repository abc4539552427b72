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
`stride=window` is blocked attention. `window=1` (a token sees itself only) is accepted here;
NATTEN requires a window of at least 2.

Token order: row-major (default), or GNA's tiled order when `tile_shape` is given. That is NATTEN's
token permute (`natten/token_permute`): each axis is padded to a multiple of `tile * dilation`,
tokens are ordered by dilation group first, then tile by tile inside the group's sub-grid, so a
query block of `prod(tile_shape)` tokens is one spatial tile of one dilation group and the layout
becomes (nearly) block-sparse. Keys may use their own `kv_tile_shape` (NATTEN's separate Q and KV
tiles). Padding tokens are never keys; padded query rows attend to nothing (zero output).
`to_tiled` / `from_tiled` move q, k, v in and out of the order (adding and removing the padding).
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
                 tile_shape=None, kv_tile_shape=None) -> BlockLayout:
    """Neighborhood attention over a token grid `(L,)`, `(H, W)` or `(T, H, W)` (see the module docstring).

    Args:
        grid: grid shape; the sequence has `prod(grid)` tokens (more in the tiled order: padding).
        window, dilation, stride: ints or per-axis tuples (`window * dilation <= size`, `stride <= window`).
        causal: bool or per-axis tuple of bools.
        block_q, block_k: tile sizes in tokens.
        tile_shape: None for row-major token order; a per-axis query tile shape for GNA's tiled order
            (`block_q` must equal `prod(tile_shape)`).
        kv_tile_shape: key/value tile shape in the tiled order (default `tile_shape`; `block_k` must
            equal its product). Move q with `to_tiled(q, grid, tile_shape, dilation=dilation)` and
            k, v with `kv_tile_shape`.
    """
    grid, window, dilation, stride, causal = _check_na_args(grid, window, dilation, stride, causal)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid, divide=False)
    if tile_shape is None and kv_tile_shape is not None:
        raise ValueError("kv_tile_shape needs tile_shape (the tiled order)")
    kv_tile_shape = check_tile_shape("kv_tile_shape", tile_shape if kv_tile_shape is None else kv_tile_shape, grid,
                                     divide=False)
    if tile_shape is not None and (block_q, block_k) != (math.prod(tile_shape), math.prod(kv_tile_shape)):
        raise ValueError(f"with tile_shape={tile_shape} and kv_tile_shape={kv_tile_shape}, block_q and block_k must "
                         f"equal their products {math.prod(tile_shape)} and {math.prod(kv_tile_shape)}, got "
                         f"block_q={block_q}, block_k={block_k}")
    lo, hi = zip(*(neighborhood_ranges(n, k, d, s, c) for n, k, d, s, c in zip(grid, window, dilation, stride, causal)))
    return grid_interval_layout(grid, [x[None] for x in lo], [x[None] for x in hi], dilation,
                                tile_shape=tile_shape, kv_tile_shape=kv_tile_shape, tile_dilation=dilation,
                                block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------- tiled token order
def tiled_permutation(grid, tile_shape, *, dilation=1) -> Tensor:
    """long `[L']`: `perm[t]` is the row-major index of the token at position t of the tiled order,
    or -1 where position t is padding (`L' = prod(padded grid) >= prod(grid)`)."""
    grid = check_grid(grid)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid, divide=False)
    if tile_shape is None:
        raise ValueError("tile_shape must be given for the tiled order")
    dilation = per_axis("dilation", dilation, len(grid))
    coords = token_coords(grid, tile_shape, dilation)
    index = torch.zeros(len(coords), dtype=torch.long)
    for axis, n in enumerate(grid):
        index = index * n + coords[:, axis]
    return torch.where((coords < torch.tensor(grid)).all(-1), index, -1)


def to_tiled(x: Tensor, grid, tile_shape, *, dilation=1, dim: int = -2) -> Tensor:
    """Reorder the token dimension `dim` of `x` (e.g. `[B, H, L, D]`) from row-major to tiled order
    (zeros at the padding positions)."""
    perm = tiled_permutation(grid, tile_shape, dilation=dilation)
    length = int((perm >= 0).sum())
    _check_token_dim(x, dim, length)
    shape = list(x.shape)
    shape[dim] = 1
    padded = torch.cat([x, x.new_zeros(shape)], dim=dim)  # index `length` is the zero pad
    return padded.index_select(dim, torch.where(perm >= 0, perm, length).to(x.device))


def from_tiled(x: Tensor, grid, tile_shape, *, dilation=1, dim: int = -2) -> Tensor:
    """Inverse of `to_tiled`: tiled order back to row-major (padding dropped)."""
    perm = tiled_permutation(grid, tile_shape, dilation=dilation)
    _check_token_dim(x, dim, len(perm))
    real = (perm >= 0).nonzero().flatten()
    return x.index_select(dim, real[torch.argsort(perm[real])].to(x.device))


def _check_token_dim(x, dim, length):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.shape[dim] != length:
        raise ValueError(f"x must have prod(grid)={length} tokens along dim {dim}, got shape {list(x.shape)}")

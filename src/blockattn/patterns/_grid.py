"""Shared machinery for layouts whose tiles are evaluated token by token.

Two builders, both computing tile masks directly (never an `[Lq, Lk]` tensor):

- `grid_interval_layout`: tokens on a 1-3D grid; per axis, every query keeps the keys whose
  coordinate lies in `[lo, hi]` and in its dilation group. Neighborhood, halo and (shifted)
  window attention are all of this form. Candidate tiles come from the per-axis ranges.
- `tile_layout`: any vectorised `allowed(h, q_idx, k_idx)` over a given block-level superset.

Token order on a grid is row-major, or GNA's tiled order (`tile_shape`, NATTEN's token permute):
tokens are grouped by dilation group, then tile by tile, so that a block of `prod(tile_shape)`
tokens is one spatial tile of one dilation group; the grid is padded to whole tiles.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from blockattn.layout import BlockLayout, _block_lists, _cdiv, _check_positive_int, _layout_from_tile_masks, \
    _tile_bounds

_TILE_CHUNK = 2048


# ---------------------------------------------------------------------- argument checks
def check_grid(grid) -> tuple[int, ...]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid):
        raise ValueError(f"grid must be (L,), (H, W) or (T, H, W) of positive ints, got {grid!r}")
    return tuple(int(n) for n in grid)


def per_axis(name: str, value, ndim: int, *, kind=int, minimum: int | None = 1) -> tuple:
    """`value` (one int/bool or one per axis) as a tuple of length `ndim`."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{name} must be one value or {ndim} values (one per grid axis), got {value!r}")
        values = tuple(value)
    else:
        values = (value,) * ndim
    for v in values:
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            raise ValueError(f"{name} must be an int >= {minimum} or a tuple of them, got {value!r}")
    return values


def check_tile_shape(name: str, tile_shape, grid: tuple[int, ...], *, divide: bool = True) -> tuple[int, ...] | None:
    if tile_shape is None:
        return None
    tile_shape = per_axis(name, tile_shape, len(grid))
    if divide and any(n % t for n, t in zip(grid, tile_shape)):
        raise ValueError(f"{name} {tile_shape} must divide the grid {grid} on every axis")
    return tile_shape


# ---------------------------------------------------------------------- token order
def padded_grid(grid: Sequence[int], tile_shape: Sequence[int],
                dilation: Sequence[int] | None = None) -> tuple[int, ...]:
    """NATTEN's padded grid for the tiled order: each axis rounded up to a multiple of `tile * dilation`."""
    dilation = dilation or (1,) * len(grid)
    return tuple(-(-n // (t * d)) * t * d for n, t, d in zip(grid, tile_shape, dilation))


def _tiled_shape(grid, tile_shape, dilation):
    dilation = tuple(dilation or (1,) * len(grid))
    rest = [p // (t * d) for p, t, d in zip(padded_grid(grid, tile_shape, dilation), tile_shape, dilation)]
    return dilation, list(dilation) + rest + list(tile_shape)


def token_coords(grid: Sequence[int], tile_shape: Sequence[int] | None = None,
                 dilation: Sequence[int] | None = None) -> Tensor:
    """long `[L, ndim]`: grid coordinates of each token index (row-major, or tiled order).

    The tiled order is NATTEN's token permute: tokens are ordered by dilation group, then by tile
    of the group's sub-grid, then inside the tile, so a tile holds `tile_shape` members of one
    dilation group. The grid is padded to `padded_grid(...)`; padding tokens have a coordinate
    `>= grid` on some axis (so `L` may exceed `prod(grid)`).
    """
    if tile_shape is None:
        return _unravel(torch.arange(math.prod(grid)), grid)
    dilation, shape = _tiled_shape(grid, tile_shape, dilation)
    ndim = len(grid)
    parts = _unravel(torch.arange(math.prod(shape)), shape)
    group, rest, inside = parts[:, :ndim], parts[:, ndim:2 * ndim], parts[:, 2 * ndim:]
    return (rest * torch.tensor(tile_shape) + inside) * torch.tensor(dilation) + group


def coords_to_index(coords: Tensor, grid: Sequence[int], tile_shape: Sequence[int] | None = None,
                    dilation: Sequence[int] | None = None) -> Tensor:
    """Token index of grid coordinates `[..., ndim]` in the given order (inverse of `token_coords`)."""
    if tile_shape is None:
        return _ravel(coords, grid)
    dilation, shape = _tiled_shape(grid, tile_shape, dilation)
    d, t = torch.tensor(dilation), torch.tensor(tile_shape)
    within = coords // d
    return _ravel(torch.cat([coords % d, within // t, within % t], dim=-1), shape)


def _unravel(index: Tensor, shape: Sequence[int]) -> Tensor:
    coords = []
    for n in reversed(shape):
        coords.append(index % n)
        index = index // n
    return torch.stack(coords[::-1], dim=-1)


def _ravel(coords: Tensor, shape: Sequence[int]) -> Tensor:
    index = torch.zeros(coords.shape[:-1], dtype=torch.long)
    for axis, n in enumerate(shape):
        index = index * n + coords[..., axis]
    return index


# ---------------------------------------------------------------------- builders
def tile_layout(q_len: int, k_len: int, block_q: int, block_k: int, candidates: Tensor,
                allowed: Callable[[Tensor, Tensor, Tensor], Tensor], *, allow_empty_rows: bool = False) -> BlockLayout:
    """Layout from a block-level superset `candidates` (bool `[H, nQ, nK]`) and a vectorised rule
    `allowed(h [T,1,1], q_idx [T,bq,1], k_idx [T,1,bk]) -> bool [T,bq,bk]` evaluated only on those tiles.
    Tiles left empty are dropped, fully allowed tiles carry no mask."""
    counts, indices = _block_lists(candidates[None])
    template = BlockLayout(counts, indices, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                           allow_empty_rows=True)
    tb, th, tq, tk = template.listed_tiles()
    masks = torch.empty(len(tb), block_q, block_k, dtype=torch.bool)
    rows, cols = torch.arange(block_q).view(1, -1, 1), torch.arange(block_k).view(1, 1, -1)
    for at in range(0, len(tb), _TILE_CHUNK):
        sl = slice(at, at + _TILE_CHUNK)
        q_idx = (tq[sl].view(-1, 1, 1) * block_q + rows).clamp(max=q_len - 1)
        k_idx = (tk[sl].view(-1, 1, 1) * block_k + cols).clamp(max=k_len - 1)
        keep = allowed(th[sl].view(-1, 1, 1), q_idx, k_idx)
        masks[sl] = keep & _tile_bounds(tq[sl], tk[sl], q_len, k_len, block_q, block_k)
    return _layout_from_tile_masks(template, (tb, th, tq, tk), masks, allow_empty_rows=allow_empty_rows)


def grid_interval_layout(grid: tuple[int, ...], lo: Sequence[Tensor], hi: Sequence[Tensor],
                         dilation: Sequence[int], *, tile_shape: tuple[int, ...] | None, block_q: int,
                         block_k: int, kv_tile_shape: tuple[int, ...] | None = None,
                         tile_dilation: Sequence[int] | None = None) -> BlockLayout:
    """Per axis `a`, query coordinate `x` keeps key coordinate `y` iff `lo[a][h, x] <= y <= hi[a][h, x]`
    and `y % dilation[a] == x % dilation[a]`; a key is kept when every axis keeps it.
    `lo[a]`, `hi[a]`: long `[H, grid[a]]` (H = 1 for head-independent patterns).
    Queries are in the order of `tile_shape`, keys in that of `kv_tile_shape` (default the same), both
    grouped by `tile_dilation` (see `token_coords`); padding tokens are never keys and query no key."""
    block_q, block_k = _check_positive_int("block_q", block_q), _check_positive_int("block_k", block_k)
    kv_tile_shape = tile_shape if kv_tile_shape is None else kv_tile_shape
    heads = lo[0].shape[0]
    q_coords = token_coords(grid, tile_shape, tile_dilation)
    k_coords = token_coords(grid, kv_tile_shape, tile_dilation)
    size = torch.tensor(grid)
    q_valid, k_valid = (q_coords < size).all(-1), (k_coords < size).all(-1)
    padded = not (bool(q_valid.all()) and bool(k_valid.all()))
    q_len, k_len = len(q_coords), len(k_coords)
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    candidates = torch.zeros(heads, n_q, n_k, dtype=torch.bool)
    for qb in range(n_q):
        qc = q_coords[qb * block_q:(qb + 1) * block_q]
        qc = qc[q_valid[qb * block_q:(qb + 1) * block_q]]
        if len(qc) == 0:
            continue
        for h in range(heads):
            # the union of the block's per-axis ranges (restricted to its dilation residues) is a box
            # that contains every allowed key
            ranges = []
            for a, d in enumerate(dilation):
                r = torch.arange(int(lo[a][h, qc[:, a]].min()), int(hi[a][h, qc[:, a]].max()) + 1)
                ranges.append(r[torch.isin(r % d, (qc[:, a] % d).unique())])
            box = torch.cartesian_prod(*ranges).view(-1, len(grid))
            candidates[h, qb, coords_to_index(box, grid, kv_tile_shape, tile_dilation) // block_k] = True
    clamp = size - 1

    def allowed(h, q_idx, k_idx):
        qc, kc = q_coords[q_idx], k_coords[k_idx]  # [T, bq, 1, ndim], [T, 1, bk, ndim]
        keep = q_valid[q_idx] & k_valid[k_idx]
        qc, kc = torch.minimum(qc, clamp), torch.minimum(kc, clamp)
        for a, d in enumerate(dilation):
            x, y = qc[..., a], kc[..., a]
            keep &= (y >= lo[a][h, x]) & (y <= hi[a][h, x])
            if d > 1:
                keep &= (y % d) == (x % d)
        return keep

    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed, allow_empty_rows=padded)

"""GNA's analytical simulator: how many tiles a neighborhood-attention problem computes, before running it.

Hassani et al., "Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed
of Light" (arXiv 2504.16922), Sec. "simulator": with tokens in tiled order (NATTEN's token
permute: padded to whole tiles, each dilation group tiled separately, separate Q and KV tile
shapes), a query tile and a key tile are both boxes of one dilation group, and neighborhood
attention is an AND over axes, so a (query tile, key tile) pair is visited iff it is visited on
every axis. The number of visited tiles is therefore the product over axes of one-dimensional
counts, computed exactly from the per-axis window rule without building any layout. The
upper-bound speedup over dense attention with the same tiles is `total / visited`: what a kernel
that skips unvisited tiles and pays nothing else (no masking, no per-tile overhead) gets.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from blockattn.patterns._grid import check_tile_shape, padded_grid, token_coords
from blockattn.patterns.neighborhood import _check_na_args, neighborhood_ranges

__all__ = ["Simulation", "simulate"]


@dataclasses.dataclass(frozen=True)
class Simulation:
    grid: tuple[int, ...]
    tile_shape: tuple[int, ...]
    kv_tile_shape: tuple[int, ...]
    visited_tiles: int
    total_tiles: int
    pair_fraction: float  # fraction of token pairs the pattern allows (the FLOP-level sparsity)

    @property
    def tile_fraction(self) -> float:
        """Fraction of (query tile, key tile) pairs computed."""
        return self.visited_tiles / self.total_tiles

    @property
    def speedup_upper_bound(self) -> float:
        """Dense time over sparse time if only the visited tiles cost anything."""
        return self.total_tiles / self.visited_tiles

    @property
    def tile_efficiency(self) -> float:
        """Useful share of the computed tile area (1.0 = perfectly block-sparse)."""
        return self.pair_fraction / self.tile_fraction

    def describe(self) -> str:
        return (f"grid {self.grid}  q tile {self.tile_shape}  kv tile {self.kv_tile_shape}\n"
                f"  tiles computed      {self.visited_tiles} / {self.total_tiles} = {self.tile_fraction:.4f}\n"
                f"  token pairs allowed {self.pair_fraction:.4f} (tile efficiency {self.tile_efficiency:.3f})\n"
                f"  upper-bound speedup over dense: {self.speedup_upper_bound:.2f}x")


def simulate(grid, *, window, dilation=1, stride=1, causal=False, tile_shape, kv_tile_shape=None,
             order: str = "tiled") -> Simulation:
    """Predict the tiles `patterns.neighborhood(grid, ..., tile_shape=tile_shape, kv_tile_shape=kv_tile_shape)`
    computes. Grids the tiles do not divide are padded (padding tiles count in the total, like the
    extra work a kernel does on them); `kv_tile_shape` defaults to `tile_shape`.

    `order="row_major"` is GNA's single-dimensional tiling baseline: tiles of `prod(tile_shape)`
    consecutive row-major tokens. That count is not separable over axes, so it is read off the
    row-major layout (`neighborhood(grid, ..., block_q=prod(tile_shape), block_k=prod(kv_tile_shape))`).
    """
    if order not in ("tiled", "row_major"):
        raise ValueError(f"order must be 'tiled' or 'row_major', got {order!r}")
    grid, window, dilation, stride, causal = _check_na_args(grid, window, dilation, stride, causal)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid, divide=False)
    if tile_shape is None:
        raise ValueError("tile_shape must be given (the simulator models the tiled token order)")
    kv_tile_shape = check_tile_shape("kv_tile_shape", tile_shape if kv_tile_shape is None else kv_tile_shape, grid,
                                     divide=False)
    if order == "row_major":
        from blockattn.patterns.neighborhood import neighborhood
        layout = neighborhood(grid, window=window, dilation=dilation, stride=stride, causal=causal,
                              block_q=math.prod(tile_shape), block_k=math.prod(kv_tile_shape))
        return Simulation(grid, tile_shape, kv_tile_shape, int(layout.kv_counts.sum()),
                          layout.num_q_blocks * layout.num_k_blocks, layout.token_density())
    visited, total, pairs = 1, 1, 1.0
    for n, k, d, s, c, tq, tk in zip(grid, window, dilation, stride, causal, tile_shape, kv_tile_shape):
        lo, hi = neighborhood_ranges(n, k, d, s, c)
        x, y = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
        allowed = (y >= lo.view(-1, 1)) & (y <= hi.view(-1, 1)) & (y % d == x % d)  # one axis: [n, n]
        pairs *= float(allowed.sum()) / (n * n)
        # the axis in tiled order (dilation group, tile, inside), padding never allowed
        (pq,), (pk,) = padded_grid((n,), (tq,), (d,)), padded_grid((n,), (tk,), (d,))
        padded = torch.zeros(pq, pk, dtype=torch.bool)
        padded[:n, :n] = allowed
        order_q, order_k = token_coords((n,), (tq,), (d,))[:, 0], token_coords((n,), (tk,), (d,))[:, 0]
        axis_tiles = padded[order_q][:, order_k].view(pq // tq, tq, pk // tk, tk).any(3).any(1)
        visited *= int(axis_tiles.sum())
        total *= (pq // tq) * (pk // tk)
    return Simulation(grid, tile_shape, kv_tile_shape, visited, total, pairs)

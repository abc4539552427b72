"""Blocked local attention with a halo (HaloNet).

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (CVPR 2021,
arXiv 2103.12731). Rule: the H x W map is cut into non-overlapping b x b query blocks; every query
of block (i, j) attends to the (b + 2h) x (b + 2h) window of keys centred on its block, i.e. keys
within `halo` pixels of the block on each axis. The paper (and timm) zero-pads the halo at image
borders; a layout has no padding tokens, so its border windows are smaller (the padded keys are
masked). `modules.HaloAttention(border="zero_pad")` adds the padded slots back exactly, from the
engine's log-sum-exp.
"""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout
from blockattn.patterns._grid import check_grid, check_tile_shape, grid_interval_layout, per_axis

__all__ = ["halo"]


def halo(grid, *, block_size=8, halo=3, block_q: int = 64, block_k: int = 64, tile_shape=None) -> BlockLayout:
    """HaloNet attention on a 2D grid `(H, W)` (1D and 3D grids work the same way).

    Args:
        block_size: query block side b (int or per axis); it must divide the grid (paper default 8).
        halo: extra keys on each side of the block (int or per axis; paper default 3).
        tile_shape: None for row-major tokens, or a tiled token order (see `patterns.neighborhood`);
            `tile_shape=block_size` with `block_q = block_k = b*b` makes each query block one tile.
    """
    grid = check_grid(grid)
    block_size = per_axis("block_size", block_size, len(grid))
    halo = per_axis("halo", halo, len(grid), minimum=0)
    if any(n % b for n, b in zip(grid, block_size)):
        raise ValueError(f"block_size {block_size} must divide the grid {grid} on every axis (HaloNet's rule)")
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid)
    lo, hi = [], []
    for n, b, h in zip(grid, block_size, halo):
        start = (torch.arange(n) // b) * b
        lo.append((start - h).clamp(min=0)[None])
        hi.append((start + b - 1 + h).clamp(max=n - 1)[None])
    return grid_interval_layout(grid, lo, hi, (1,) * len(grid), tile_shape=tile_shape, block_q=block_q,
                                block_k=block_k)

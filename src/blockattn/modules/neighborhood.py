"""Neighborhood attention modules (NATTEN's `NeighborhoodAttention1D/2D/3D`), running on the block engine.

Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023), "Faster Neighborhood Attention"
(arXiv 2403.04690), "Generalized Neighborhood Attention" (arXiv 2504.16922). Each token attends to
its `window` nearest neighbors per axis (with dilation, stride and per-axis causality; see
`blockattn.patterns.neighborhood` for the exact rule). Inputs are channels-last `[B, *grid, C]`.
NATTEN's optional relative positional bias is not included (the engine takes no additive bias).
"""
from __future__ import annotations

import math

from blockattn.modules._grid_attention import GridAttention
from blockattn.patterns._grid import check_tile_shape, per_axis
from blockattn.patterns.neighborhood import neighborhood

__all__ = ["NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d"]


class _NeighborhoodAttention(GridAttention):
    def __init__(self, dim: int, heads: int, window, *, dilation=1, stride=1, causal=False, tile_shape=None,
                 block: int = 64, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__(dim, heads, qkv_bias=qkv_bias, backend=backend)
        self.window = per_axis("window", window, self.ndim)
        self.dilation = per_axis("dilation", dilation, self.ndim)
        self.stride = per_axis("stride", stride, self.ndim)
        self.causal = per_axis("causal", causal, self.ndim, kind=bool)
        self.tile_shape = None if tile_shape is None else per_axis("tile_shape", tile_shape, self.ndim)
        self.tile_dilation = self.dilation
        self.block = math.prod(self.tile_shape) if self.tile_shape is not None else block

    def build_layout(self, grid):
        check_tile_shape("tile_shape", self.tile_shape, grid, divide=False)
        return neighborhood(grid, window=self.window, dilation=self.dilation, stride=self.stride, causal=self.causal,
                            block_q=self.block, block_k=self.block, tile_shape=self.tile_shape)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, window={self.window}, dilation={self.dilation}, "
                f"stride={self.stride}, causal={self.causal}, tile_shape={self.tile_shape}")


class NeighborhoodAttention1d(_NeighborhoodAttention):
    """1D neighborhood attention over `[B, L, C]`."""
    ndim = 1


class NeighborhoodAttention2d(_NeighborhoodAttention):
    """2D neighborhood attention over `[B, H, W, C]`."""
    ndim = 2


class NeighborhoodAttention3d(_NeighborhoodAttention):
    """3D neighborhood attention over `[B, T, H, W, C]`."""
    ndim = 3

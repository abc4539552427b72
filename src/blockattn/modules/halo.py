"""HaloNet's blocked local self-attention with a halo, as a module over `[B, H, W, C]`.

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (CVPR 2021).
Each b x b query block attends to the (b + 2h) x (b + 2h) key window around it (paper defaults
b = 8, h = 3, 8 heads). Tokens run in the b x b tiled order, so each query block is exactly one
engine tile. Differences from the paper, by design: keys outside the image are masked rather than
zero-padded, and the 2D relative-position logits are not included (the engine takes no bias).
"""
from __future__ import annotations

from blockattn.modules._grid_attention import GridAttention
from blockattn.patterns.halo import halo

__all__ = ["HaloAttention"]


class HaloAttention(GridAttention):
    ndim = 2

    def __init__(self, dim: int, heads: int = 8, *, block_size: int = 8, halo: int = 3, qkv_bias: bool = True,
                 backend: str = "auto"):
        super().__init__(dim, heads, qkv_bias=qkv_bias, backend=backend)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
            raise ValueError(f"halo must be a non-negative int, got {halo!r}")
        self.block_size, self.halo = block_size, halo
        self.tile_shape = (block_size, block_size)

    def build_layout(self, grid):
        b = self.block_size
        return halo(grid, block_size=b, halo=self.halo, block_q=b * b, block_k=b * b, tile_shape=self.tile_shape)

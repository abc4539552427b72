"""Shared body of the grid attention modules: qkv projection, one layout per grid size, output projection."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import blockattn
from blockattn.layout import BlockLayout
from blockattn.patterns.neighborhood import from_tiled, to_tiled


class GridAttention(nn.Module):
    """Multi-head self-attention over a channels-last token grid `[B, *grid, C]` restricted to a layout.

    Subclasses implement `build_layout(grid) -> BlockLayout` (cached per grid shape) and may set
    `tile_shape` to run in a tiled token order.
    """

    ndim: int | None = None

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"heads must be a positive int dividing dim={dim}, got {heads!r}")
        self.dim, self.heads, self.backend = dim, heads, backend
        self.tile_shape: tuple[int, ...] | None = None
        self.tile_dilation = 1  # the tiled order groups tokens by dilation group (NATTEN's token permute)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._layouts: dict[tuple[int, ...], BlockLayout] = {}

    def build_layout(self, grid: tuple[int, ...]) -> BlockLayout:
        raise NotImplementedError

    def layout(self, grid: tuple[int, ...]) -> BlockLayout:
        if grid not in self._layouts:
            self._layouts[grid] = self.build_layout(grid)
        return self._layouts[grid]

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if (self.ndim is not None and x.dim() != self.ndim + 2) or x.dim() < 3 or x.shape[-1] != self.dim:
            shape = "[B, " + ", ".join(f"X{i}" for i in range(self.ndim or 1)) + f", C={self.dim}]"
            raise ValueError(f"x must have shape {shape} (channels last), got {list(x.shape)}")
        batch, grid = x.shape[0], tuple(x.shape[1:-1])
        length, head_dim = math.prod(grid), self.dim // self.heads
        layout = self.layout(grid)  # first, so a grid the pattern rejects is reported in its terms
        qkv = self.qkv(x.reshape(batch, length, self.dim))
        q, k, v = qkv.view(batch, length, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        if self.tile_shape is not None:
            q, k, v = (to_tiled(t, grid, self.tile_shape, dilation=self.tile_dilation) for t in (q, k, v))
        out = blockattn.attention(q, k, v, layout, backend=self.backend)
        if self.tile_shape is not None:
            out = from_tiled(out, grid, self.tile_shape, dilation=self.tile_dilation)
        return self.proj(out.transpose(1, 2).reshape(batch, *grid, self.dim))

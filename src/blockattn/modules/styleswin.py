"""StyleSwin's double attention: half of the heads in local windows, half in shifted windows.

Zhang et al., "StyleSwin: Transformer-based GAN for High-resolution Image Generation" (CVPR 2022),
official `StyleSwinTransformerBlock`: one qkv projection; channels `[0, C/2)` (the first half of the
heads) attend inside regular `window` x `window` windows, channels `[C/2, C)` inside windows shifted
by `window // 2` (Swin's cyclic shift with its mask); the halves are concatenated and projected.
Here both halves are one per-head layout, so a single engine call computes them. The style-driven
AdaIN norms, MLP and Swin relative position bias of the full block live outside this module.
"""
from __future__ import annotations

from blockattn.modules._grid_attention import GridAttention
from blockattn.patterns.windows import double_window

__all__ = ["StyleSwinDoubleAttention"]


class StyleSwinDoubleAttention(GridAttention):
    ndim = 2

    def __init__(self, dim: int, heads: int, *, window: int = 8, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__(dim, heads, qkv_bias=qkv_bias, backend=backend)
        if heads % 2:
            raise ValueError(f"heads must be even (half local, half shifted), got {heads}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window

    def build_layout(self, grid):
        return double_window(grid, heads=self.heads, window=self.window)

"""Window and shifted-window attention on 2D grids (Swin, StyleSwin, LaMamba-Diff local windows).

Liu et al. (Swin), Zhang et al., "StyleSwin: Transformer-based GAN for High-resolution Image
Generation" (CVPR 2022), Fu et al., "LaMamba-Diff" (arXiv 2408.02615).

Rule: the grid is cut into non-overlapping `window` x `window` windows and each token attends to
the tokens of its window. A shift of s moves the window boundaries by s (Swin's cyclic shift plus
its mask): on each axis the windows become `[0, s)`, `[s, s + w)`, ..., and the wrapped last window
is split at the image border, so shifted windows never join opposite borders. If an axis is not
longer than the window, the window covers the axis and the shift is 0 (Swin's rule, applied per
axis here: Swin and StyleSwin test `min(H, W) <= window` and then shrink the window and drop the
shift on both axes, so on non-square grids such as (4, 16) with window 8 the two differ;
StyleSwin itself only builds square maps).

StyleSwin's double attention gives half of the heads the regular windows and the other half the
shifted ones (`double_window`).
"""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout
from blockattn.patterns._grid import check_grid, check_tile_shape, grid_interval_layout, per_axis

__all__ = ["window_attention", "double_window"]


def _window_ranges(n: int, window: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n <= window:
        window, shift = n, 0
    x = torch.arange(n)
    start = torch.div(x - shift, window, rounding_mode="floor") * window + shift
    return start.clamp(min=0), (start + window - 1).clamp(max=n - 1)


def _check(grid, window, shift):
    grid = check_grid(grid)
    window = per_axis("window", window, len(grid))
    shift = per_axis("shift", shift, len(grid), minimum=0)
    for axis, (n, w, s) in enumerate(zip(grid, window, shift)):
        if n > w and n % w:
            raise ValueError(f"window must divide the grid on every axis longer than it; axis {axis}: "
                             f"size={n}, window={w}")
        if s >= w:
            raise ValueError(f"shift must be smaller than window; axis {axis}: shift={s}, window={w}")
    return grid, window, shift


def window_attention(grid, *, window=8, shift=0, block_q: int = 64, block_k: int = 64,
                     tile_shape=None) -> BlockLayout:
    """(Shifted) window attention; `window` and `shift` are ints or per-axis tuples
    (Swin/LaMamba defaults: window 8, shift 0 or window // 2)."""
    grid, window, shift = _check(grid, window, shift)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid)
    lo, hi = zip(*(_window_ranges(n, w, s) for n, w, s in zip(grid, window, shift)))
    return grid_interval_layout(grid, [x[None] for x in lo], [x[None] for x in hi], (1,) * len(grid),
                                tile_shape=tile_shape, block_q=block_q, block_k=block_k)


def double_window(grid, *, heads: int, window=8, shift=None, block_q: int = 64, block_k: int = 64,
                  tile_shape=None) -> BlockLayout:
    """StyleSwin double attention as a per-head layout: heads `[0, heads/2)` use regular windows,
    heads `[heads/2, heads)` windows shifted by `shift` (default `window // 2`)."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 2 or heads % 2:
        raise ValueError(f"heads must be an even int >= 2 (half local, half shifted), got {heads!r}")
    grid = check_grid(grid)
    window_t = per_axis("window", window, len(grid))
    shift = tuple(w // 2 for w in window_t) if shift is None else shift
    grid, window_t, shift = _check(grid, window_t, shift)
    tile_shape = check_tile_shape("tile_shape", tile_shape, grid)
    lo, hi = [], []
    for n, w, s in zip(grid, window_t, shift):
        (lo0, hi0), (lo1, hi1) = _window_ranges(n, w, 0), _window_ranges(n, w, s)
        half = heads // 2
        lo.append(torch.stack([lo0] * half + [lo1] * half))
        hi.append(torch.stack([hi0] * half + [hi1] * half))
    return grid_interval_layout(grid, lo, hi, (1,) * len(grid), tile_shape=tile_shape, block_q=block_q,
                                block_k=block_k)

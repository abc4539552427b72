"""Window / shifted-window layouts against Swin's own construction (roll, partition, region mask)."""
import itertools

import pytest
import torch

from blockattn import patterns


def _swin_mask(grid, window, shift):
    """Swin: roll the map by -shift, cut regular windows; the attention mask forbids pairs whose
    region labels (from the slices (0, -w), (-w, -s), (-s, None)) differ. Returns the mask in the
    original (unrolled) token order."""
    nd = len(grid)
    coords = list(itertools.product(*[range(n) for n in grid]))
    L = len(coords)
    mask = torch.zeros(L, L, dtype=torch.bool)

    def label(c):
        window_id, region = [], []
        for x, n, w, s in zip(c, grid, window, shift):
            if n <= w:
                w, s = n, 0
            r = (x - s) % n  # position after torch.roll(-s)
            window_id.append(r // w)
            region.append(0 if r < n - w else (1 if r < n - s else 2) if s else 0)
        return tuple(window_id), tuple(region)

    labels = [label(c) for c in coords]
    for i in range(L):
        for j in range(L):
            mask[i, j] = labels[i] == labels[j]
    return mask


@pytest.mark.parametrize("grid,window,shift", [((8, 8), 4, 0), ((8, 8), 4, 2), ((12, 8), (4, 8), (2, 3)),
                                               ((6, 16), 8, 4), ((16,), 4, 1)])
def test_windows_match_swin(grid, window, shift):
    layout = patterns.window_attention(grid, window=window, shift=shift, block_q=16, block_k=16)
    nd = len(grid)
    w = window if isinstance(window, tuple) else (window,) * nd
    s = shift if isinstance(shift, tuple) else (shift,) * nd
    assert torch.equal(layout.to_token_mask()[0, 0], _swin_mask(grid, w, s))


def test_double_window_heads():
    grid, heads = (8, 8), 4
    layout = patterns.double_window(grid, heads=heads, window=4, block_q=16, block_k=16)
    mask = layout.to_token_mask()[0]
    assert mask.shape[0] == heads
    regular, shifted = _swin_mask(grid, (4, 4), (0, 0)), _swin_mask(grid, (4, 4), (2, 2))
    for h in range(heads):
        assert torch.equal(mask[h], regular if h < heads // 2 else shifted)


def test_unshifted_windows_are_block_diagonal_when_tiled():
    layout = patterns.window_attention((16, 16), window=8, block_q=64, block_k=64, tile_shape=(8, 8))
    assert torch.equal(layout.to_dense()[0, 0], torch.eye(4, dtype=torch.bool)) and layout.tile_masks is None


@pytest.mark.parametrize("fn,kwargs,match", [
    (patterns.window_attention, dict(grid=(10, 10), window=4), "window must divide"),
    (patterns.window_attention, dict(grid=(8, 8), window=4, shift=4), "shift"),
    (patterns.double_window, dict(grid=(8, 8), heads=3, window=4), "heads"),
])
def test_window_errors(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)

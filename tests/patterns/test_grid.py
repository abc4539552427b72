"""Token-order helpers and the tile builder shared by the grid patterns; a property test of
neighborhood layouts on random grids against the per-position definition."""
import math

import torch
from hypothesis import given, settings, strategies as st

from blockattn import patterns
from blockattn.patterns._grid import coords_to_index, tile_layout, token_coords
from tests.patterns.test_neighborhood import _naive_mask


def test_coords_round_trip():
    for grid, tile in (((6,), None), ((4, 6), None), ((4, 6), (2, 3)), ((2, 4, 6), (1, 2, 3))):
        coords = token_coords(grid, tile)
        assert coords.shape == (math.prod(grid), len(grid))
        assert torch.equal(coords_to_index(coords, grid, tile), torch.arange(math.prod(grid)))
        assert len({tuple(c) for c in coords.tolist()}) == math.prod(grid)  # a permutation of the grid
    # tiled order: the first tile's tokens come first
    assert token_coords((4, 6), (2, 3))[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_tile_layout_drops_empty_and_keeps_rule():
    candidates = torch.ones(1, 3, 4, dtype=torch.bool)
    rule = lambda h, q, k: (k % 5) == (q % 5)  # noqa: E731
    layout = tile_layout(20, 30, 8, 8, candidates, rule)
    q, k = torch.arange(20).view(-1, 1), torch.arange(30).view(1, -1)
    assert torch.equal(layout.to_token_mask()[0, 0], (k % 5) == (q % 5))


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_neighborhood_random(data):
    nd = data.draw(st.integers(1, 2))
    grid = tuple(data.draw(st.integers(3, 12)) for _ in range(nd))
    window, dilation, stride, causal = [], [], [], []
    for n in grid:
        d = data.draw(st.integers(1, max(1, n // 3)))
        k = data.draw(st.integers(1, n // d))
        window.append(k)
        dilation.append(d)
        stride.append(data.draw(st.integers(1, k)))
        causal.append(data.draw(st.booleans()))
    block = data.draw(st.sampled_from([4, 8, 16]))
    layout = patterns.neighborhood(grid, window=tuple(window), dilation=tuple(dilation), stride=tuple(stride),
                                   causal=tuple(causal), block_q=block, block_k=block)
    assert torch.equal(layout.to_token_mask()[0, 0], _naive_mask(grid, window, dilation, stride, causal))

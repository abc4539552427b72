"""GNA simulator: its predicted tile counts equal those of the layout built in tiled order."""
import math

import pytest

from blockattn import patterns
from blockattn.patterns.simulator import simulate


@pytest.mark.parametrize("grid,tile,kv_tile,window,dilation,stride,causal", [
    ((32, 32), (8, 8), None, 13, 1, 1, False),
    ((32, 32), (4, 8), (8, 4), (7, 5), (2, 1), (1, 5), False),
    ((16, 24), (4, 4), None, (5, 9), 1, (5, 3), (True, False)),
    ((8, 8, 8), (2, 4, 4), None, (3, 5, 3), (1, 1, 2), (1, 2, 1), (True, False, False)),
    ((60,), (6,), (10,), 9, 3, 2, False),
])
def test_prediction_equals_layout(grid, tile, kv_tile, window, dilation, stride, causal):
    sim = simulate(grid, window=window, dilation=dilation, stride=stride, causal=causal, tile_shape=tile,
                   kv_tile_shape=kv_tile)
    kv_tile = kv_tile or tile
    if kv_tile == tile:
        layout = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, causal=causal,
                                       block_q=math.prod(tile), block_k=math.prod(tile), tile_shape=tile)
        assert sim.visited_tiles == int(layout.kv_counts.sum())
        assert sim.total_tiles == layout.num_q_blocks * layout.num_k_blocks
        assert sim.tile_fraction == pytest.approx(layout.density())
        assert sim.pair_fraction == pytest.approx(layout.token_density())
    else:
        # unequal tiles: count visited (query tile, key tile) pairs from the row-major token mask
        mask = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, causal=causal,
                                     block_q=16, block_k=16).to_token_mask()[0, 0]
        perm_q, perm_k = patterns.tiled_permutation(grid, tile), patterns.tiled_permutation(grid, kv_tile)
        tiled = mask[perm_q][:, perm_k]
        L, bq, bk = mask.shape[0], math.prod(tile), math.prod(kv_tile)
        visited = tiled.view(L // bq, bq, L // bk, bk).any(3).any(1)
        assert sim.visited_tiles == int(visited.sum())
    assert sim.speedup_upper_bound == pytest.approx(1 / sim.tile_fraction)
    assert 0 < sim.tile_efficiency <= 1


def test_blocked_attention_is_perfectly_block_sparse():
    sim = simulate((32, 32), window=8, stride=8, tile_shape=(8, 8))
    assert sim.tile_efficiency == pytest.approx(1.0)
    assert sim.speedup_upper_bound == pytest.approx(16.0)


def test_errors():
    with pytest.raises(ValueError, match="tile_shape must be given"):
        simulate((8, 8), window=3, tile_shape=None)
    with pytest.raises(ValueError, match="kv_tile_shape"):
        simulate((8, 8), window=3, tile_shape=(4, 4), kv_tile_shape=(3, 3))
    with pytest.raises(ValueError, match="window"):
        simulate((8, 8), window=9, tile_shape=(4, 4))

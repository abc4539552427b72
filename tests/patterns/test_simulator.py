"""GNA simulator: its predicted tile counts equal those of the layout built in (NATTEN's) tiled order."""
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
    ((30, 20), (4, 8), (8, 4), 5, (3, 2), 1, False),  # padding
    ((32, 32), (4, 4), None, 4, 4, (1, 4), (False, True)),
])
def test_prediction_equals_layout(grid, tile, kv_tile, window, dilation, stride, causal):
    sim = simulate(grid, window=window, dilation=dilation, stride=stride, causal=causal, tile_shape=tile,
                   kv_tile_shape=kv_tile)
    kv_tile = kv_tile or tile
    layout = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, causal=causal,
                                   block_q=math.prod(tile), block_k=math.prod(kv_tile), tile_shape=tile,
                                   kv_tile_shape=kv_tile)
    assert sim.visited_tiles == int(layout.kv_counts.sum())
    assert sim.total_tiles == layout.num_q_blocks * layout.num_k_blocks
    assert sim.tile_fraction == pytest.approx(layout.density())
    real = math.prod(grid)
    assert sim.pair_fraction == pytest.approx(float(layout.to_token_mask().sum()) / real ** 2)
    assert sim.speedup_upper_bound == pytest.approx(1 / sim.tile_fraction)
    assert 0 < sim.tile_efficiency <= 1


@pytest.mark.parametrize("grid,window,dilation,stride,tile,speedup", [
    ((64, 64), 8, 4, 8, (8, 8), 64.0),  # the audit's case: GNA's per-group order is perfectly block-sparse
    ((64, 64), 8, 2, 8, (8, 8), 64.0), ((64, 64), 8, 1, 8, (8, 8), 64.0)])
def test_dilated_blocked_attention_is_block_sparse(grid, window, dilation, stride, tile, speedup):
    sim = simulate(grid, window=window, dilation=dilation, stride=stride, tile_shape=tile)
    assert sim.speedup_upper_bound == pytest.approx(speedup)
    assert sim.tile_efficiency == pytest.approx(1.0)


def test_blocked_attention_is_perfectly_block_sparse():
    sim = simulate((32, 32), window=8, stride=8, tile_shape=(8, 8))
    assert sim.tile_efficiency == pytest.approx(1.0)
    assert sim.speedup_upper_bound == pytest.approx(16.0)


def test_row_major_order_is_the_single_dimensional_baseline():
    """GNA's comparison: on rows longer than a tile, multi-dimensional tiles visit fewer tiles than runs of
    consecutive row-major tokens (here 1,012 against 1,792)."""
    tiled = simulate((64, 128), window=7, tile_shape=(8, 8))
    flat = simulate((64, 128), window=7, tile_shape=(8, 8), order="row_major")
    layout = patterns.neighborhood((64, 128), window=7, block_q=64, block_k=64)
    assert flat.visited_tiles == int(layout.kv_counts.sum()) and flat.total_tiles == 128 * 128
    assert flat.pair_fraction == pytest.approx(tiled.pair_fraction)
    assert tiled.visited_tiles < flat.visited_tiles


def test_errors():
    with pytest.raises(ValueError, match="tile_shape must be given"):
        simulate((8, 8), window=3, tile_shape=None)
    with pytest.raises(ValueError, match="kv_tile_shape"):
        simulate((8, 8), window=3, tile_shape=(4, 4), kv_tile_shape=(3, 3, 3))
    with pytest.raises(ValueError, match="window"):
        simulate((8, 8), window=9, tile_shape=(4, 4))
    with pytest.raises(ValueError, match="order"):
        simulate((8, 8), window=3, tile_shape=(4, 4), order="hilbert")

"""HaloNet layout against a per-position loop over query blocks and their haloed windows."""
import itertools
import math

import pytest
import torch

from blockattn import patterns


def _naive(grid, b, h):
    coords = list(itertools.product(*[range(n) for n in grid]))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            # key inside the (b + 2h)-wide window centred on the query's block, on every axis
            mask[qi, ki] = all((x // bb) * bb - hh <= y < (x // bb) * bb + bb + hh
                               for x, y, bb, hh in zip(qc, kc, b, h))
    return mask


@pytest.mark.parametrize("grid,b,h,block", [((8, 8), 4, 1, 16), ((12, 8), (4, 2), (2, 0), 16),
                                            ((16, 16), 8, 3, 64), ((12,), 3, 2, 8)])
def test_halo_matches_naive(grid, b, h, block):
    layout = patterns.halo(grid, block_size=b, halo=h, block_q=block, block_k=block)
    nd = len(grid)
    bt = b if isinstance(b, tuple) else (b,) * nd
    ht = h if isinstance(h, tuple) else (h,) * nd
    assert torch.equal(layout.to_token_mask()[0, 0], _naive(grid, bt, ht))


def test_halo_zero_is_block_diagonal_in_tiled_order():
    layout = patterns.halo((16, 16), block_size=4, halo=0, block_q=16, block_k=16, tile_shape=(4, 4))
    assert torch.equal(layout.to_dense()[0, 0], torch.eye(16, dtype=torch.bool))
    assert layout.tile_masks is None  # perfectly block-sparse: no token-level masks


def test_halo_tiled_equals_permuted_row_major():
    grid, tile = (24, 24), (8, 8)  # the middle block sees the full 14 x 14 window
    tiled = patterns.halo(grid, block_size=8, halo=3, tile_shape=tile).to_token_mask()[0, 0]
    row = patterns.halo(grid, block_size=8, halo=3).to_token_mask()[0, 0]
    perm = patterns.tiled_permutation(grid, tile)
    assert torch.equal(row[perm][:, perm], tiled)
    assert math.isclose(float(tiled.sum(1).max()), 14 * 14)


@pytest.mark.parametrize("kwargs,match", [(dict(grid=(10, 10), block_size=4), "block_size"),
                                          (dict(grid=(8, 8), halo=-1), "halo"),
                                          (dict(grid=(8, 8), block_size=(4, 4, 4)), "block_size")])
def test_halo_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patterns.halo(**kwargs)

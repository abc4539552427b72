"""Neighborhood attention layouts against a per-position definition (NATTEN's border rule), the
count property, the tiled order and its permutation helpers, and argument errors."""
import itertools
import math

import pytest
import torch

import blockattn
from blockattn import patterns
from tests.patterns.helpers import masked_attention


def _axis_keys(x, n, k, d, s, causal):
    """Keys one axis allows for query coordinate x: a loop over the dilation group, window start
    clamped into the group (shifted, not truncated, at the borders)."""
    group = [c for c in range(n) if c % d == x % d]
    m, xi = len(group), group.index(x)
    if causal:
        leader = min((xi // s) * s + s - 1, m - 1)
        return {group[j] for j in range(m) if j <= xi and leader - j < k}
    leader = min((xi // s) * s + s // 2, m - 1)
    start = min(max(leader - k // 2, 0), m - k)
    return {group[j] for j in range(start, start + k)}


def _naive_mask(grid, window, dilation, stride, causal, order=None):
    """bool [L, L] by looping over query positions; `order` lists grid coordinates per token index."""
    order = order or list(itertools.product(*[range(n) for n in grid]))
    index = {c: i for i, c in enumerate(order)}
    L = len(order)
    mask = torch.zeros(L, L, dtype=torch.bool)
    for qi, qc in enumerate(order):
        per_axis = [_axis_keys(x, n, k, d, s, c) for x, n, k, d, s, c in
                    zip(qc, grid, window, dilation, stride, causal)]
        for kc in itertools.product(*[sorted(p) for p in per_axis]):
            mask[qi, index[kc]] = True
    return mask


def _tup(v, n):
    return tuple(v) if isinstance(v, tuple) else (v,) * n


CASES = [
    ((37,), 7, 1, 1, False, 16),
    ((37,), 7, 2, 1, False, 16),
    ((40,), 6, 3, 1, False, 8),         # even window, dilation with a non-divisible length
    ((37,), 7, 2, 3, False, 16),
    ((37,), 5, 1, 2, True, 16),
    ((33,), 4, 2, 4, True, 8),
    ((11, 13), 5, 1, 1, False, 16),
    ((11, 13), (3, 5), (2, 1), (1, 2), False, 16),
    ((12, 10), (5, 3), 1, (3, 2), (True, False), 32),
    ((9, 14), (4, 6), (2, 2), (2, 4), (False, True), 8),
    ((4, 6, 7), (3, 3, 5), (1, 2, 1), (1, 1, 2), (True, False, False), 16),
    ((5, 6, 6), 3, 1, (2, 3, 1), False, 64),
]


@pytest.mark.parametrize("grid,window,dilation,stride,causal,block", CASES)
def test_neighborhood_matches_naive(grid, window, dilation, stride, causal, block):
    nd = len(grid)
    layout = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, causal=causal,
                                   block_q=block, block_k=block)
    w, d, s, c = _tup(window, nd), _tup(dilation, nd), _tup(stride, nd), _tup(causal, nd)
    expected = _naive_mask(grid, w, d, s, c)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    # block lists hold exactly the tiles with an allowed pair
    L = math.prod(grid)
    n = -(-L // block)
    tiles = torch.nn.functional.pad(expected, (0, n * block - L, 0, n * block - L))
    tiles = tiles.view(n, block, n, block).any(3).any(1)
    assert torch.equal(layout.to_dense()[0, 0], tiles)
    if not any(c):  # count property: exactly `window` keys per axis for every query
        assert torch.equal(expected.sum(1), torch.full((L,), math.prod(w)))


@pytest.mark.parametrize("grid,tile,window,dilation,stride", [
    ((8, 12), (4, 4), (5, 7), 1, 1), ((8, 8), (4, 2), 3, (2, 1), (1, 3)), ((4, 8, 8), (2, 4, 4), (3, 5, 3), 1, 1)])
def test_tiled_order(grid, tile, window, dilation, stride):
    nd = len(grid)
    block = math.prod(tile)
    layout = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, block_q=block,
                                   block_k=block, tile_shape=tile)
    perm = patterns.tiled_permutation(grid, tile)
    coords = list(itertools.product(*[range(n) for n in grid]))
    order = [coords[i] for i in perm.tolist()]
    expected = _naive_mask(grid, _tup(window, nd), _tup(dilation, nd), _tup(stride, nd), (False,) * nd, order)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    # the tiled layout is the row-major one with rows and columns permuted
    row_major = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, block_q=block,
                                      block_k=block).to_token_mask()[0, 0]
    assert torch.equal(row_major[perm][:, perm], expected)
    # tiles never cross tile boundaries: each token's tile-mates are the tile's contiguous block
    assert sorted(perm[:block].tolist()) == sorted(
        i for i, c in enumerate(coords) if all(x < t for x, t in zip(c, tile)))


def test_tiled_attention_round_trip():
    grid, tile = (8, 8), (4, 4)
    q, k, v = (torch.randn(2, 3, 64, 16, dtype=torch.float64) for _ in range(3))
    layout = patterns.neighborhood(grid, window=5, block_q=16, block_k=16, tile_shape=tile)
    out = patterns.from_tiled(blockattn.attention(*(patterns.to_tiled(x, grid, tile) for x in (q, k, v)),
                                                  layout, backend="torch"), grid, tile)
    mask = patterns.neighborhood(grid, window=5, block_q=16, block_k=16).to_token_mask()
    torch.testing.assert_close(out, masked_attention(q, k, v, mask), rtol=1e-10, atol=1e-10)
    x = torch.randn(2, 64, 5)
    assert torch.equal(patterns.from_tiled(patterns.to_tiled(x, grid, tile, dim=1), grid, tile, dim=1), x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(10,), window=11), "window \\* dilation"),
    (dict(grid=(10,), window=3, dilation=4), "window \\* dilation"),
    (dict(grid=(10,), window=3, stride=4), "stride"),
    (dict(grid=(10, 10), window=(3, 3, 3)), "window"),
    (dict(grid=(10, 10), window=3, causal=1), "causal"),
    (dict(grid=(10, 10, 10, 10), window=3), "grid"),
    (dict(grid=(0,), window=1), "grid"),
    (dict(grid=(8, 8), window=3, tile_shape=(3, 4)), "tile_shape"),
    (dict(grid=(8, 8), window=3, tile_shape=(4, 4)), "block_q"),
    (dict(grid=(8,), window=0), "window"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        patterns.neighborhood(**kwargs)


def test_permutation_errors():
    with pytest.raises(ValueError, match="tile_shape"):
        patterns.tiled_permutation((8, 8), None)
    with pytest.raises(ValueError, match="tokens"):
        patterns.to_tiled(torch.zeros(1, 1, 10, 2), (8, 8), (4, 4))
    with pytest.raises(TypeError, match="x must be"):
        patterns.from_tiled([1, 2], (2,), (1,))

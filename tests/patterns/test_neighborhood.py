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


def natten_permutation(grid, tile, dilation):
    """NATTEN's token permute (`token_permute/torch_impl.py`: pad each axis to a multiple of tile * dilation,
    view as (rest, tile, dilation) per axis, move all dilation modes first, then rest, then tile) applied
    to the row-major token indices; -1 marks padding."""
    index = torch.arange(math.prod(grid)).view(grid)
    padded = [-(-n // (t * d)) * t * d for n, t, d in zip(grid, tile, dilation)]
    x = torch.full(padded, -1, dtype=torch.long)
    x[tuple(slice(0, n) for n in grid)] = index
    nd = len(grid)
    x = x.view(*[m for p, t, d in zip(padded, tile, dilation) for m in (p // (t * d), t, d)])
    order = [3 * a + 2 for a in range(nd)] + [3 * a for a in range(nd)] + [3 * a + 1 for a in range(nd)]
    return x.permute(*order).reshape(-1)


def _tiled_expected(grid, window, dilation, stride, causal, perm_q, perm_k):
    """The row-major per-position mask moved into the (padded) tiled orders; padding sees and is seen by nothing."""
    row_major = _naive_mask(grid, window, dilation, stride, causal)
    expected = torch.zeros(len(perm_q), len(perm_k), dtype=torch.bool)
    rq, rk = perm_q >= 0, perm_k >= 0
    expected[rq.nonzero().flatten()[:, None], rk.nonzero().flatten()] = row_major[perm_q[rq]][:, perm_k[rk]]
    return expected


@pytest.mark.parametrize("grid,tile,kv_tile,window,dilation,stride", [
    ((8, 12), (4, 4), None, (5, 7), 1, 1), ((8, 8), (4, 2), None, 3, (2, 1), (1, 3)),
    ((4, 8, 8), (2, 4, 4), None, (3, 5, 3), 1, 1),
    ((16, 16), (4, 4), None, 4, 4, 4),  # dilation groups tiled separately: perfectly block-sparse
    ((10, 9), (4, 4), None, 3, (2, 3), 1),  # padding: the tile does not divide the grid
    ((12, 8), (4, 4), (2, 8), (5, 3), (2, 1), (2, 1)),  # different Q and KV tiles
    ((6, 7, 5), (2, 2, 4), (4, 2, 2), 3, (2, 1, 1), 1)])
def test_tiled_order(grid, tile, kv_tile, window, dilation, stride):
    nd = len(grid)
    kv_tile = kv_tile or tile
    layout = patterns.neighborhood(grid, window=window, dilation=dilation, stride=stride, block_q=math.prod(tile),
                                   block_k=math.prod(kv_tile), tile_shape=tile, kv_tile_shape=kv_tile)
    d = _tup(dilation, nd)
    perm_q = patterns.tiled_permutation(grid, tile, dilation=dilation)
    perm_k = patterns.tiled_permutation(grid, kv_tile, dilation=dilation)
    assert torch.equal(perm_q, natten_permutation(grid, tile, d))
    assert torch.equal(perm_k, natten_permutation(grid, kv_tile, d))
    expected = _tiled_expected(grid, _tup(window, nd), d, _tup(stride, nd), (False,) * nd, perm_q, perm_k)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    # a tile holds members of one dilation group only, and tiles are contiguous blocks of the order
    coords = torch.tensor(list(itertools.product(*[range(n) for n in grid])))
    block = math.prod(tile)
    for start in range(0, len(perm_q), block):
        ids = perm_q[start:start + block]
        ids = ids[ids >= 0]
        if len(ids):
            assert len({tuple(c) for c in (coords[ids] % torch.tensor(d)).tolist()}) == 1


def test_tiled_attention_round_trip_with_padding_and_dilation():
    grid, tile, kv_tile, dilation = (10, 9), (4, 4), (2, 4), (2, 1)
    q, k, v = (torch.randn(2, 3, 90, 16, dtype=torch.float64) for _ in range(3))
    layout = patterns.neighborhood(grid, window=3, dilation=dilation, block_q=16, block_k=8, tile_shape=tile,
                                   kv_tile_shape=kv_tile)
    tq = patterns.to_tiled(q, grid, tile, dilation=dilation)
    tk, tv = (patterns.to_tiled(x, grid, kv_tile, dilation=dilation) for x in (k, v))
    out = patterns.from_tiled(blockattn.attention(tq, tk, tv, layout, backend="torch"), grid, tile, dilation=dilation)
    mask = patterns.neighborhood(grid, window=3, dilation=dilation, block_q=16, block_k=16).to_token_mask()
    torch.testing.assert_close(out, masked_attention(q, k, v, mask), rtol=1e-10, atol=1e-10)


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
    (dict(grid=(8, 8), window=3, kv_tile_shape=(4, 4)), "kv_tile_shape needs tile_shape"),
    (dict(grid=(8, 8), window=3, tile_shape=(4, 4)), "block_q"),
    (dict(grid=(8, 8), window=3, tile_shape=(4, 4), kv_tile_shape=(2, 4), block_q=16, block_k=16), "block_k"),
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

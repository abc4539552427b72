"""BiFormer routing against a float64 loop implementation of bi-level routing, and its properties."""
import pytest
import torch

import blockattn
from blockattn.methods.biformer import BiFormer


def naive_regions(length, n_win, grid):
    if grid is None:
        size = -(-length // n_win)
        return [i // size for i in range(length)]
    height, width = grid
    rh, rw = -(-height // n_win), -(-width // n_win)
    raw = [(y // rh) * n_win + (x // rw) for y in range(height) for x in range(width)]
    occupied = sorted(set(raw))  # windows holding no token (n_win not dividing a side) are not regions
    return [occupied.index(r) for r in raw]


def naive_biformer_mask(q, k, *, n_win, topk, causal, grid=None):
    q, k = q.double(), k.double()
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    labels = naive_regions(length, n_win, grid)
    n_regions = max(labels) + 1
    members = [[i for i in range(length) if labels[i] == r] for r in range(n_regions)]
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        affinity = torch.zeros(n_regions, n_regions, dtype=torch.float64)
        for h in range(heads):
            for r in range(n_regions):
                qr = sum(q[b, h, i] for i in members[r]) / len(members[r])
                for s in range(n_regions):
                    kr = sum(k[b, h // group, j] for j in members[s]) / len(members[s])
                    affinity[r, s] += float(qr @ kr)
        for r in range(n_regions):
            if causal:
                cands = [s for s in range(n_regions) if members[s][0] <= members[r][0] and s != r]
                ranked = [r] + sorted(cands, key=lambda s: -float(affinity[r, s]))
            else:
                ranked = sorted(range(n_regions), key=lambda s: -float(affinity[r, s]))
            for s in ranked[:topk]:
                for i in members[r]:
                    for j in members[s]:
                        mask[b, 0, i, j] = (j <= i) if causal else True
    return mask


@pytest.mark.parametrize("length,n_win,topk,causal,grid,tile", [
    (200, 7, 3, False, None, 32), (200, 7, 3, True, None, 32), (144, 3, 2, False, (12, 12), 16),
    (150, 4, 1, True, (10, 15), 32), (96, 5, 8, False, None, 16),
    # n_win does not divide the grid: 16 = 5 x 3 + 1 and 10 = 4 x 2 + 2 leave windows with no token
    (256, 7, 4, False, (16, 16), 32), (256, 7, 4, True, (16, 16), 32), (100, 7, 4, False, (10, 10), 16)])
def test_token_mask_equals_naive_rule(length, n_win, topk, causal, grid, tile):
    g = torch.Generator().manual_seed(length + topk)
    q, k = torch.randn(2, 4, length, 8, generator=g), torch.randn(2, 2, length, 8, generator=g)
    layout = BiFormer(n_win=n_win, topk=topk, causal=causal, tile_size=tile).select(q, k, grid=grid)
    expected = naive_biformer_mask(q, k, n_win=n_win, topk=topk, causal=causal, grid=grid)
    assert torch.equal(layout.to_token_mask(), expected)


def test_exact_topk_regions_and_causality():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 6, 256, 16, generator=g), torch.randn(1, 3, 256, 16, generator=g)
    method = BiFormer(n_win=8, topk=3)
    labels, routed = method.route(q, k)
    assert (routed.sum(-1) == 3).all()
    causal = BiFormer(n_win=8, topk=3, causal=True)
    labels, routed = causal.route(q, k)
    assert routed.diagonal(dim1=1, dim2=2).all()  # own region always routed
    assert not routed.triu(1).any()               # no future region
    assert (routed.sum(-1) == torch.arange(8).clamp(max=2) + 1).all()
    mask = causal.select(q, k).to_token_mask()
    assert not mask.triu(1).any()


def test_defaults_on_smollm2_shapes_through_sparse_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 512, 64, generator=g) for h in (9, 3, 3))
    method = BiFormer(causal=True)
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    mask = method.select(q, k).to_token_mask()
    keys, values = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)


@pytest.mark.parametrize("params", [dict(n_win=0), dict(topk=0), dict(tile_size=-1), dict(causal=1),
                                    dict(topk=2.5)])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        BiFormer(**params)


def test_uneven_grid_routes_to_occupied_regions_only():
    q, k = torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)
    labels, routed = BiFormer(n_win=7).route(q, k, grid=(16, 16))
    sizes = torch.bincount(labels)
    assert len(sizes) == 36 and (sizes > 0).all()  # 6 x 6 occupied windows of 3 x 3 (edges 1 x 3 ...)
    assert (routed.sum(-1) == 4).all()
    assert BiFormer(n_win=7).select(q, k, grid=(16, 16)).row_has_keys().all()


def test_bad_grid():
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match="grid"):
        BiFormer().select(q, k, grid=(9, 11))
    with pytest.raises(ValueError, match="q_len"):
        BiFormer().select(q, torch.randn(1, 2, 90, 8))

"""VMoBA against a float64 loop implementation of its partitions and global threshold rule."""
import itertools
import math

import pytest
import torch

import blockattn
from blockattn.methods.vmoba import VMoBA


def naive_vmoba_mask(q, k, grid, layer, *, threshold, block_1d, block_2d, block_3d, selection):
    """Loops: partition, mean-pooled gate, min-max normalisation, own block first, ranked others."""
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    t, h, w = grid
    shape = [(block_1d, h, w), (t,) + block_2d, block_3d][layer % 3]
    cells = {}
    for index, (a, b, c) in enumerate(itertools.product(range(t), range(h), range(w))):
        cells.setdefault((a // shape[0], b // shape[1], c // shape[2]), []).append(index)
    blocks = [cells[key] for key in sorted(cells)]
    own = {i: j for j, members in enumerate(blocks) for i in members}
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for bi in range(batch):
        for hi in range(heads):
            keys = k[bi, hi // group]
            means = [sum(keys[j] for j in members) / len(members) for members in blocks]
            gate = {(i, j): float(q[bi, hi, i] @ means[j]) for i in range(length) for j in range(len(blocks))}
            groups = [list(gate)] if selection == "head_global" else \
                [[(i, j) for j in range(len(blocks))] for i in range(length)]
            for entries in groups:
                low, high = min(gate[e] for e in entries), max(gate[e] for e in entries)
                span = high - low if high - low > 1e-6 else 1.0
                norm = {e: (gate[e] - low) / span for e in entries}
                total = sum(norm.values())
                remain = max(threshold - sum(norm[e] for e in entries if own[e[0]] == e[1]) / (total + 1e-6), 0.0)
                others = sorted((e for e in entries if own[e[0]] != e[1]), key=lambda e: -norm[e])
                running = 0.0
                for i, j in entries:
                    if own[i] == j:
                        mask[bi, hi, i, blocks[j]] = True
                for i, j in others:
                    running += norm[(i, j)]
                    mask[bi, hi, i, blocks[j]] = True
                    if running / (total + 1e-6) >= remain:
                        break
    return mask


@pytest.mark.parametrize("grid,layer,threshold,selection", [
    ((4, 6, 5), 0, 0.3, "head_global"), ((3, 8, 8), 1, 0.5, "head_global"), ((4, 6, 6), 2, 0.4, "query_head"),
    ((2, 5, 7), 5, 0.9, "head_global"), ((3, 4, 4), 1, 0.6, "query_head")])
def test_token_mask_equals_naive_rule(grid, layer, threshold, selection):
    length = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(length + layer)
    q, k = torch.randn(1, 2, length, 8, generator=g) * 2, torch.randn(1, 1, length, 8, generator=g) * 2
    params = dict(threshold=threshold, block_1d=1, block_2d=(4, 4), block_3d=(2, 3, 3), selection=selection)
    layout = VMoBA(tile_size=16, **params).select(q, k, grid=grid, layer=layer)
    assert torch.equal(layout.to_token_mask(), naive_vmoba_mask(q, k, grid, layer, **params))


def test_properties_threshold_share_partitions_own_block():
    g = torch.Generator().manual_seed(8)
    grid = (4, 8, 8)
    q, k = torch.randn(2, 4, 256, 16, generator=g) * 2, torch.randn(2, 2, 256, 16, generator=g) * 2
    method = VMoBA(threshold=0.4, block_2d=(4, 4), block_3d=(2, 4, 4))
    sizes = [len(torch.unique(method.block_ids(grid, layer))) for layer in range(3)]
    assert sizes == [4, 2 * 2, 2 * 2 * 2]                       # 1D frames, 2D patches, 3D cubes
    for layer in range(3):
        gates = method.gates(q, k, grid=grid, layer=layer)
        ids = method.block_ids(grid, layer)
        assert gates[:, :, torch.arange(256), ids].all()         # own block always kept
        pooled = torch.zeros(2, 4, sizes[layer], 16).index_add_(2, ids, k.repeat_interleave(2, 1))
        pooled /= torch.bincount(ids).view(1, 1, -1, 1)
        gate = q @ pooled.transpose(-1, -2)
        low, high = gate.amin(dim=(2, 3), keepdim=True), gate.amax(dim=(2, 3), keepdim=True)
        norm = (gate - low) / (high - low)
        kept = (norm * gates).sum(dim=(2, 3)) / norm.sum(dim=(2, 3))
        assert (kept >= 0.4 - 1e-4).all()                        # the kept share reaches the threshold
        assert (gates.sum(dim=(2, 3)) < 256 * sizes[layer]).all()  # and not everything is kept


def test_attention_through_layout_is_exact():
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
    from blockattn.ops.reference import reference_attention
    layout = VMoBA(threshold=0.3, tile_size=32).select(q, k, grid=(2, 8, 8), layer=2)
    out = blockattn.attention(q, k, v, layout)
    assert torch.allclose(out.double(), reference_attention(q.double(), k.double(), v.double(), layout), atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(threshold=0), "threshold"), (dict(block_2d=(4,)), "block_2d"),
                                            (dict(block_3d=(1, 0, 2)), "block_3d"), (dict(selection="top"), "selection")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        blockattn.methods.get("vmoba", **params)


@pytest.mark.parametrize("grid,message", [((4, 4, 4), "tokens"), (None, "grid"), ((8, 8), "grid")])
def test_bad_grid(grid, message):
    q = torch.randn(1, 1, 60, 8)
    with pytest.raises(ValueError, match=message):
        VMoBA().select(q, q, grid=grid)

"""PAROAttention against a float64 loop implementation of its reordering and selection rule."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.paro import ORDERS, PAROAttention, order_indices


def naive_concentration(q, k, order, *, density, block, sample_blocks, causal):
    """[B, Hq] float64: mean mass of sampled permuted query blocks inside their best key blocks."""
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    n_blocks = -(-length // block)
    position = {int(order[p]): p for p in range(length)}
    sampled = torch.linspace(0, n_blocks - 1, min(sample_blocks, n_blocks)).round().long().unique().tolist()
    out = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for qb in sampled:
                rows = [int(order[p]) for p in range(qb * block, min(length, (qb + 1) * block))]
                mass = [0.0] * n_blocks
                candidates = set()
                for i in rows:
                    keys = [j for j in range(length) if not causal or j <= i]
                    logits = torch.stack([q[b, h, i] @ k[b, h // group, j] for j in keys]) / math.sqrt(dim)
                    probs = torch.softmax(logits, 0)
                    for j, p in zip(keys, probs.tolist()):
                        mass[position[j] // block] += p / len(rows)
                        candidates.add(position[j] // block)
                keep = max(1, math.ceil(len(candidates) * density))
                out[b, h] += sum(sorted(mass, reverse=True)[:keep])
    return out / len(sampled)


def naive_paro_mask(q, k, orders, *, density, block, causal):
    """Token mask [B, Hq, L, L] of the block selection on the permuted tokens, in original order."""
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    n_blocks = -(-length // block)
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            order = [int(x) for x in orders[b, h]]
            position = {order[p]: p for p in range(length)}
            for qb in range(n_blocks):
                members = order[qb * block:(qb + 1) * block]
                pooled = sum(q[b, h, i] for i in members) / len(members)
                last = max(members)
                keys = [j for j in range(length) if not causal or j <= last]
                logits = torch.stack([pooled @ k[b, h // group, j] for j in keys]) / math.sqrt(dim)
                mass = [0.0] * n_blocks
                candidates = {qb}
                for j, p in zip(keys, torch.softmax(logits, 0).tolist()):
                    mass[position[j] // block] += p
                    candidates.add(position[j] // block)
                keep = max(1, math.ceil(len(candidates - {qb} | ({qb} if any(position[j] // block == qb for j in keys) else set())) * density))
                ranked = [qb] + sorted(candidates - {qb}, key=lambda c: -mass[c])
                chosen = set(ranked[:keep])
                for i in members:
                    for j in range(length):
                        mask[b, h, i, j] = position[j] // block in chosen and (not causal or j <= i)
    return mask


def local_along_t(grid, dim=32, seed=0):
    """q = k: every token points along its (h, w) location's own random direction: attention is local along T."""
    t, h, w = grid
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(h * w, dim, generator=g), dim=-1) * 6
    x = directions.repeat(t, 1) + 0.1 * torch.randn(t * h * w, dim, generator=g)
    return x.view(1, 1, t * h * w, dim)


@pytest.mark.parametrize("grid,block,density,causal,heads", [
    ((4, 4, 6), 16, 0.3, False, (4, 2)), ((3, 5, 7), 16, 0.5, False, (2, 1)), ((2, 6, 6), 16, 0.4, True, (2, 1))])
def test_permutation_and_mask_equal_naive_rule(grid, block, density, causal, heads):
    g = torch.Generator().manual_seed(sum(grid))
    length = math.prod(grid)
    q, k = torch.randn(1, heads[0], length, 8, generator=g), torch.randn(1, heads[1], length, 8, generator=g)
    method = PAROAttention(density=density, block_size=block, sample_blocks=3, causal=causal)
    order, names = method.permutation(q, k, grid)
    naive = torch.stack([naive_concentration(q, k, order_indices(grid, o), density=density, block=block,
                                             sample_blocks=3, causal=causal) for o in ORDERS], -1)
    for h in range(heads[0]):
        chosen = ORDERS.index(names[0][h])
        assert torch.equal(order[0, h], order_indices(grid, names[0][h]))
        assert naive[0, h, chosen] >= naive[0, h].max() - 1e-5
    expected = naive_paro_mask(q, k, order, density=density, block=block, causal=causal)
    assert torch.equal(method.select(q, k, grid=grid).to_token_mask(), expected)


def test_reordering_makes_local_video_attention_block_diagonal():
    grid = (8, 4, 8)
    x = local_along_t(grid)
    method = PAROAttention(density=0.25, block_size=32)
    order, names = method.permutation(x, x, grid)
    position = torch.empty(256, dtype=torch.long)
    position[order[0, 0]] = torch.arange(256)
    frames_block = (position // 32).view(8, 32)  # [T, H*W]: block of each location's frames
    assert (frames_block == frames_block[0]).all()  # every location's frames share one block
    chosen = method.concentration(x, x, order[0, 0])
    identity = method.concentration(x, x, torch.arange(math.prod(grid)))
    assert float(chosen) > float(identity) + 0.3
    # the selected layout keeps far more attention mass than the same density in the identity order
    dense = torch.softmax(x.double() @ x.double().transpose(-1, -2) / math.sqrt(32), -1)
    kept = (dense * method.select(x, x, grid=grid).to_token_mask()).sum(-1).mean()
    kept_identity = (dense * method.select(x, x).to_token_mask()).sum(-1).mean()  # no grid: identity order
    assert kept > 0.9 and kept > kept_identity + 0.2


@pytest.mark.parametrize("causal,quant_bits", [(False, None), (False, 8), (True, 4)])
def test_attend_unpermutes_and_equals_select(causal, quant_bits):
    grid = (4, 4, 8)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, h, 128, 16, generator=g) for h in (4, 2, 2))
    method = PAROAttention(density=0.5, block_size=16, causal=causal, quant_bits=quant_bits)
    out = method.attend(q, k, v, grid=grid, backend="torch")
    mask = method.select(q, k, grid=grid).to_token_mask()
    keys, values = k.repeat_interleave(2, 1).double(), v.repeat_interleave(2, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 4).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)
    assert mask.diagonal(dim1=-2, dim2=-1).all()
    if causal:
        assert not mask.triu(1).any()


def test_defaults_on_smollm2_shapes():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, h, 512, 64, generator=g) for h in (9, 3, 3))
    method = PAROAttention(causal=True)
    layout = method.select(q, k)
    blocks = layout.to_dense()
    assert (blocks.sum(-1) == torch.tensor([1, 1, 2, 2, 3, 3, 4, 4])).all()  # ceil(0.5 x causal blocks)
    assert blocks.diagonal(dim1=-2, dim2=-1).all() and not blocks.triu(1).any()
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("params", [dict(density=0.0), dict(density=1.5), dict(block_size=0), dict(sample_blocks=0),
                                    dict(quant_bits=3), dict(causal=None)])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        PAROAttention(**params)


def test_bad_grid():
    q = torch.randn(1, 2, 96, 8)
    with pytest.raises(ValueError, match="grid"):
        PAROAttention().select(q, q, grid=(2, 6, 7))
    with pytest.raises(ValueError, match="grid"):
        PAROAttention().select(q, q, grid=(96, 1))

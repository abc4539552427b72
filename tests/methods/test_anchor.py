"""AnchorAttention against a float64 loop implementation of its anchor and stripe rule."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.anchor import AnchorAttention


def naive_anchor_mask(q, k, *, theta, step, block):
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group_size = heads // k.shape[1]
    scale = 1 / math.sqrt(dim)
    init = min(block, length)
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h // group_size]
            logit = lambda i, j: float(q[b, h, i] @ keys[j]) * scale  # noqa: E731
            anchor = []
            for i in range(length):
                start = i // (block * step) * block * step
                anchor.append(max(logit(i, j) for j in range(i + 1) if j < init or j >= start))
            n_q = -(-length // block)
            means = []
            for qb in range(n_q):
                rows = range(qb * block, min(length, (qb + 1) * block))
                means.append((sum(q[b, h, i] for i in rows) / len(rows), sum(anchor[i] for i in rows) / len(rows)))
            for qb in range(n_q):
                g = qb // step
                start = g * block * step
                members = range(g * step, min(n_q, (g + 1) * step))
                chosen = {j for j in range(init, start)
                          if any(float(means[m][0] @ keys[j]) * scale + theta >= means[m][1] for m in members)}
                for i in range(qb * block, min(length, (qb + 1) * block)):
                    for j in range(i + 1):
                        mask[b, h, i, j] = j < init or j >= start or j in chosen
    return mask


@pytest.mark.parametrize("length,theta,step,block", [(160, 1.0, 2, 16), (200, 2.5, 3, 16), (96, 0.0, 1, 32)])
def test_token_mask_equals_naive_rule(length, theta, step, block):
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(1, 2, length, 8, generator=g) * 2, torch.randn(1, 1, length, 8, generator=g) * 2
    method = AnchorAttention(theta=theta, step=step, block_size=block)
    expected = naive_anchor_mask(q, k, theta=theta, step=step, block=block)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


def test_properties_initial_block_own_group_causal_and_theta_monotone():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 6, 512, 16, generator=g) * 2, torch.randn(2, 3, 512, 16, generator=g) * 2
    masks = [AnchorAttention(theta=t, step=2, block_size=32).select(q, k).to_token_mask() for t in (0.0, 3.0, 30.0)]
    causal = torch.ones(512, 512, dtype=torch.bool).tril()
    for mask in masks:
        assert not (mask & ~causal).any()
        assert mask[..., :32].eq(causal[:, :32]).all()              # initial block always kept
        group_start = torch.arange(512) // 64 * 64
        own = (torch.arange(512).view(1, -1) >= group_start.view(-1, 1)) & causal
        assert mask[..., own].all()                                  # own group always kept
    assert (masks[0] <= masks[1]).all() and (masks[1] <= masks[2]).all()  # larger theta keeps a superset
    assert masks[2].eq(causal).all() and masks[0].sum() < masks[2].sum()


def test_attention_through_layout_is_exact():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    from blockattn.ops.reference import reference_attention
    method = AnchorAttention(theta=2.0, step=2, block_size=32)
    out = blockattn.sparse_attention(q, k, v, "anchor", theta=2.0, step=2, block_size=32)
    ref = reference_attention(q.double(), k.double(), v.double(), method.select(q, k))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(theta=-1), "theta"), (dict(step=0), "step"),
                                            (dict(block_size=3.0), "block_size"), (dict(theta="x"), "theta")])
def test_bad_parameters(params, message):
    with pytest.raises((TypeError, ValueError), match=message):
        blockattn.methods.get("anchor", **params)

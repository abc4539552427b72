"""MInference vertical-slash against a float64 loop implementation of its estimate and index rule."""
import pytest
import torch

import blockattn
from blockattn.methods.vertical_slash import VerticalSlash


def naive_vertical_slash(q, k, *, vertical_size, slash_size, last_q, block):
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    last = min(last_q, length)
    mask = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            vertical = [0.0] * length
            slash = [0.0] * length
            for i in range(length - last, length):
                row = [float(q[b, h, i] @ k[b, h // group, j]) / dim ** 0.5 for j in range(i + 1)]
                top = max(row)
                weights = [pow(2.718281828459045, x - top) for x in row]
                total = sum(weights)
                for j in range(i + 1):
                    vertical[j] += weights[j] / total
                    slash[i - j] += weights[j] / total
            for j in range(min(30, length)):
                vertical[j] = float("inf")
            for o in range(min(100, length)):
                slash[o] = last + 1 + min(100, length) - o
            v_keep = sorted(range(length), key=lambda j: -vertical[j])[:min(length, max(vertical_size, 30))]
            s_keep = sorted(range(length), key=lambda o: -slash[o])[:min(length, max(slash_size, 50))]
            for i in range(length):
                start = i // block * block
                for j in range(i + 1):
                    crossed = any(start - o <= j <= start + block - 1 - o for o in s_keep)
                    mask[b, h, i, j] = crossed or j in v_keep
    return mask


@pytest.mark.parametrize("length,v,s,last,block", [(300, 40, 60, 16, 32), (257, 35, 120, 64, 64), (180, 1, 1, 8, 16)])
def test_token_mask_equals_naive_rule(length, v, s, last, block):
    g = torch.Generator().manual_seed(length)
    q, k = torch.randn(1, 2, length, 8, generator=g) * 2, torch.randn(1, 1, length, 8, generator=g) * 2
    method = VerticalSlash(vertical_size=v, slash_size=s, last_q=last, block_size=block)
    expected = naive_vertical_slash(q, k, vertical_size=v, slash_size=s, last_q=last, block=block)
    assert torch.equal(method.select(q, k).to_token_mask(), expected)


def test_properties_counts_forced_lines_causal():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 1024, 16, generator=g), torch.randn(2, 3, 1024, 16, generator=g)
    method = VerticalSlash(vertical_size=100, slash_size=200)
    columns, diagonals = method.lines(q, k)
    assert (columns.sum(-1) == 100).all() and (diagonals.sum(-1) == 200).all()  # exact top-k counts
    assert columns[..., :30].all() and diagonals[..., :100].all()               # forced sinks and local lines
    mask = method.select(q, k).to_token_mask()
    assert not (mask & torch.ones(1024, 1024, dtype=torch.bool).triu(1)).any()  # no future key
    assert mask.diagonal(dim1=-2, dim2=-1).all() and mask[..., :30].tril().eq(
        torch.ones(1024, 30, dtype=torch.bool).tril()).all()


def test_attention_through_layout_is_exact():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 400, 16, generator=g) for _ in range(3))
    method = VerticalSlash(vertical_size=40, slash_size=60)
    from blockattn.ops.reference import reference_attention
    out = blockattn.sparse_attention(q, k, v, "vertical_slash", vertical_size=40, slash_size=60)
    ref = reference_attention(q.double(), k.double(), v.double(), method.select(q, k))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(vertical_size=0), "vertical_size"), (dict(slash_size=-3), "slash_size"),
                                            (dict(block_size=2.5), "block_size"), (dict(last_q=True), "last_q")])
def test_bad_parameters(params, message):
    with pytest.raises((TypeError, ValueError), match=message):
        blockattn.methods.get("vertical_slash", **params)


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match="q_len"):
        VerticalSlash().select(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 20, 8))

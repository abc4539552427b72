"""SALE against a float64 loop implementation of low-bit estimation and its Relative Attention Score rule."""
import math

import pytest
import torch

import blockattn
from blockattn.methods.sale import SALE


def naive_relative_scores(q, k, *, bits, block):
    q, k = q.double(), k.double()
    batch, heads, length, dim = q.shape
    group = heads // k.shape[1]
    top = 2 ** (bits - 1) - 1
    n = -(-length // block)

    def quantize(x):  # x [L, D], one scale per block of tokens
        out = torch.empty_like(x)
        for b in range(n):
            rows = x[b * block:(b + 1) * block]
            scale = max(float(rows.abs().max()), 1e-12) / top
            out[b * block:(b + 1) * block] = torch.round(rows / scale).clamp(-top, top) * scale
        return out

    scores = torch.zeros(batch, heads, n, n, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qq, kk = quantize(q[b, h]), quantize(k[b, h // group])
            for i in range(length):
                row = [float(qq[i] @ kk[j]) / math.sqrt(dim) for j in range(i + 1)]
                top_logit = max(row)
                for j, s in enumerate(row):
                    cell = (b, h, i // block, j // block)
                    scores[cell] = max(float(scores[cell]), math.exp(s - top_logit))
    return scores


@pytest.mark.parametrize("length,bits,block,threshold", [(150, 4, 16, 0.05), (200, 8, 32, 0.01), (96, 4, 32, 0.2)])
def test_selection_equals_naive_rule(length, bits, block, threshold):
    g = torch.Generator().manual_seed(length + bits)
    q, k = torch.randn(1, 4, length, 16, generator=g) * 2, torch.randn(1, 2, length, 16, generator=g) * 2
    method = SALE(bits=bits, block_size=block, threshold=threshold)
    expected = naive_relative_scores(q, k, bits=bits, block=block)
    got = method.relative_scores(q, k)
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-6)
    n = expected.shape[-1]
    keep = (expected >= threshold) | torch.eye(n, dtype=torch.bool)
    keep[..., 0] = True
    keep &= torch.ones(n, n, dtype=torch.bool).tril()
    clear = (expected - threshold).abs() > 1e-4 * threshold  # ignore float32 ties at the threshold itself
    assert torch.equal(method.select(q, k).to_dense()[clear], keep[clear])


def test_properties_sink_diagonal_causal_monotone():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 3, 512, 16, generator=g) * 2, torch.randn(2, 3, 512, 16, generator=g) * 2
    dense = [SALE(threshold=t).select(q, k).to_dense() for t in (0.5, 0.01, 1e-6)]
    for blocks in dense:
        assert blocks[..., 0].all() and blocks.diagonal(dim1=-2, dim2=-1).all()
        assert not (blocks & torch.ones(8, 8, dtype=torch.bool).triu(1)).any()
    assert (dense[0] <= dense[1]).all() and (dense[1] <= dense[2]).all()
    # the 4-bit estimate tracks the exact scores: exact relative scores of kept tiles are not tiny
    exact = SALE(bits=8).relative_scores(q, k)
    assert torch.allclose(SALE(bits=4).relative_scores(q, k), exact, atol=0.15)


def test_attention_through_layout_is_exact():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    from blockattn.ops.reference import reference_attention
    out = blockattn.sparse_attention(q, k, v, "sale", threshold=0.05)
    ref = reference_attention(q.double(), k.double(), v.double(), SALE(threshold=0.05).select(q, k))
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.parametrize("params,message", [(dict(bits=3), "bits"), (dict(threshold=0), "threshold"),
                                            (dict(threshold=1.5), "threshold"), (dict(block_size=0), "block_size")])
def test_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        blockattn.methods.get("sale", **params)

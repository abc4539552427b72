"""HiP's hierarchical top-k search against a float64 loop implementation, and its properties."""
import pytest
import torch

import blockattn
from blockattn.methods.hip import HiPAttention


def naive_hip_blocks(q, k, *, k_tokens, bq, bk, sink_blocks, causal):
    q, k = q.double(), k.double()
    batch, heads, q_len, _ = q.shape
    group = heads // k.shape[1]
    k_len = k.shape[2]
    n_q, n_k = -(-q_len // bq), -(-k_len // bk)
    budget = k_tokens // bk
    mask = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h // group]
            for qb in range(n_q):
                rows = q[b, h, qb * bq:min(q_len, (qb + 1) * bq)]
                last = min(q_len, (qb + 1) * bq) - 1 + k_len - q_len
                visible = last // bk + 1 if causal else n_k
                if visible <= budget:
                    chosen = set(range(visible))
                else:
                    nodes = [(j * visible // budget, (j + 1) * visible // budget) for j in range(budget)]
                    while True:
                        children = []
                        for s, e in nodes:
                            m = (s + e + 1) // 2
                            children += [(s, m)] + ([(m, e)] if e > m else [])

                        def score(node):
                            first, stop = node[0] * bk, min(node[1] * bk, k_len)
                            rep = (first + stop - 1) // 2
                            return float((rows @ keys[rep]).max())

                        nodes = sorted(children, key=score, reverse=True)[:budget]
                        if all(e - s == 1 for s, e in nodes):
                            break
                    chosen = {s for s, _ in nodes}
                chosen |= {j for j in range(min(sink_blocks, visible))} | {visible - 1}
                for j in chosen:
                    mask[b, h, qb, j] = True
    return mask


@pytest.mark.parametrize("q_len,k_len,k_tokens,bq,bk,sink,causal", [
    (256, 256, 64, 16, 16, 1, True), (200, 200, 48, 32, 16, 0, True), (96, 300, 60, 16, 20, 2, True),
    (160, 160, 32, 32, 8, 1, False)])
def test_blocks_equal_naive_search(q_len, k_len, k_tokens, bq, bk, sink, causal):
    g = torch.Generator().manual_seed(q_len + k_tokens)
    q, k = torch.randn(2, 4, q_len, 8, generator=g), torch.randn(2, 2, k_len, 8, generator=g)
    method = HiPAttention(k=k_tokens, block_size_q=bq, block_size_k=bk, sink_blocks=sink, causal=causal)
    expected = naive_hip_blocks(q, k, k_tokens=k_tokens, bq=bq, bk=bk, sink_blocks=sink, causal=causal)
    assert torch.equal(method.block_mask(q, k), expected)
    layout = method.select(q, k)
    assert torch.equal(layout.to_dense(), expected)


def test_every_level_keeps_the_top_k_of_its_scores_and_the_budget_is_exact():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 3, 512, 16, generator=g), torch.randn(1, 3, 512, 16, generator=g)
    method = HiPAttention(k=64, block_size_q=16, block_size_k=8, sink_blocks=0)
    levels = method.search(q, k)
    assert len(levels) > 2
    for starts, ends, scores, chosen in levels:
        worst_chosen = scores.masked_fill(~chosen, float("inf")).amin(-1)
        best_rejected = scores.masked_fill(chosen, float("-inf")).amax(-1)
        assert (worst_chosen >= best_rejected).all()
    starts, ends, _, chosen = levels[-1]
    visible = method.visible_blocks(512, 512)
    long_rows = visible > 8
    assert (chosen.sum(-1)[..., long_rows] == 8).all()
    assert ((ends - starts)[chosen] == 1).all()
    blocks = method.block_mask(q, k)
    # the search's 8 blocks plus the diagonal block when the search did not pick it
    assert ((blocks.sum(-1)[..., long_rows] - 8) <= 1).all()
    own = blocks.gather(-1, (visible - 1).view(1, 1, -1, 1).expand(1, 3, -1, 1))
    assert own.all()  # the key block holding the query block's last token
    assert not (blocks & (torch.arange(64).view(1, -1) >= visible.view(-1, 1))).any()  # no future block


def test_defaults_on_smollm2_shapes():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, 1024, 64, generator=g) for h in (9, 3, 3))
    method = HiPAttention()
    blocks = method.block_mask(q, k)
    assert blocks[..., 0].all() and blocks.diagonal(dim1=-2, dim2=-1).all() and not blocks.triu(1).any()
    assert (blocks.sum(-1)[..., 8:] >= 8).all() and (blocks.sum(-1) <= 10).all()
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    mask = method.select(q, k).to_token_mask()
    keys, values = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)


@pytest.mark.parametrize("params", [dict(k=0), dict(k=100), dict(block_size_q=0), dict(block_size_k=-64),
                                    dict(sink_blocks=-1), dict(causal=0)])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        HiPAttention(**params)


def test_causal_needs_q_len_at_most_k_len():
    with pytest.raises(ValueError, match="q_len"):
        HiPAttention().select(torch.randn(1, 1, 100, 8), torch.randn(1, 1, 50, 8))

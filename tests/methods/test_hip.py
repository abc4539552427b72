"""HiP's hierarchical top-k search against a float64 loop implementation, and its properties."""
import pytest
import torch

import blockattn
from blockattn.methods.hip import HiPAttention


def naive_hip_blocks(q, k, *, k_tokens, bq, bk, window, causal):
    """Whole tiles per query block: the search picks among the tiles wholly before the block's window
    (the last `window` keys before its causal end), the window's tiles (and the own tile) added."""
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
                end = min(q_len, (qb + 1) * bq) + k_len - q_len  # keys up to the block's last query
                visible = (end - 1) // bk + 1 if causal else n_k
                searched = max(0, end - window) // bk if causal else n_k
                if searched <= budget:
                    chosen = set(range(searched))
                else:
                    nodes = [(j * searched // budget, (j + 1) * searched // budget) for j in range(budget)]
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
                if causal:
                    chosen |= set(range(min(searched, visible - 1), visible))
                for j in chosen:
                    mask[b, h, qb, j] = True
    return mask


def naive_token_mask(blocks, *, q_len, k_len, bq, bk, sink, causal):
    mask = torch.zeros(blocks.shape[0], blocks.shape[1], q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        for j in range(k_len):
            if causal and j > i + k_len - q_len:
                continue
            mask[:, :, i, j] = blocks[:, :, i // bq, j // bk] | (j < sink)
    return mask


@pytest.mark.parametrize("q_len,k_len,k_tokens,bq,bk,sink,window,causal", [
    (256, 256, 64, 16, 16, 4, 32, True), (200, 200, 48, 32, 16, 0, 40, True), (96, 300, 60, 16, 20, 25, 20, True),
    (160, 160, 32, 32, 8, 4, 0, True), (160, 160, 32, 32, 8, 3, 128, False)])
def test_blocks_equal_naive_search(q_len, k_len, k_tokens, bq, bk, sink, window, causal):
    g = torch.Generator().manual_seed(q_len + k_tokens)
    q, k = torch.randn(2, 4, q_len, 8, generator=g), torch.randn(2, 2, k_len, 8, generator=g)
    method = HiPAttention(k=k_tokens, block_size_q=bq, block_size_k=bk, sink_tokens=sink, window=window,
                          causal=causal)
    expected = naive_hip_blocks(q, k, k_tokens=k_tokens, bq=bq, bk=bk, window=window, causal=causal)
    assert torch.equal(method.block_mask(q, k), expected)
    layout = method.select(q, k)
    tokens = naive_token_mask(expected, q_len=q_len, k_len=k_len, bq=bq, bk=bk, sink=sink, causal=causal)
    assert torch.equal(layout.to_token_mask(), tokens)


def test_no_search_slot_on_the_window_or_diagonal():
    # the audit's property: with a locality bias the old search spent a slot on the diagonal tile
    g = torch.Generator().manual_seed(3)
    pos = torch.arange(1024, dtype=torch.float32).view(-1, 1)
    wave = torch.cat([torch.cos(pos / 40), torch.sin(pos / 40)], -1).repeat(1, 8) * 2
    q = wave + 0.3 * torch.randn(1, 2, 1024, 16, generator=g)
    k = wave + 0.3 * torch.randn(1, 2, 1024, 16, generator=g)
    method = HiPAttention(k=256, block_size_q=32, block_size_k=32)
    starts, ends, _, chosen = method.search(q, k)[-1]
    searched = method.search_blocks(1024, 1024)
    picked = starts.masked_fill(~chosen, -1)
    assert (picked < searched.view(1, 1, -1, 1)).all()
    visible = method.visible_blocks(1024, 1024)
    long_rows = searched > 8
    assert (chosen.sum(-1)[..., long_rows] == 8).all()       # 8 slots, all outside the window
    blocks = method.block_mask(q, k)
    window_tiles = (visible - searched)[long_rows]
    assert torch.equal(blocks.sum(-1)[..., long_rows], (8 + window_tiles).expand(1, 2, -1))


def test_every_level_keeps_the_top_k_of_its_scores_and_the_budget_is_exact():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 3, 512, 16, generator=g), torch.randn(1, 3, 512, 16, generator=g)
    method = HiPAttention(k=64, block_size_q=16, block_size_k=8, window=0)
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
    assert blocks.diagonal(dim1=-2, dim2=-1).all() and not blocks.triu(1).any()
    # query block m: window = tiles m-1 and m (128 keys), the search picks 8 of tiles 0..m-2
    rows = torch.arange(1, 16)
    assert (blocks.sum(-1)[..., 10:] == 10).all() and blocks[..., rows, rows - 1].all()
    out = blockattn.sparse_attention(q, k, v, method, backend="torch")
    mask = method.select(q, k).to_token_mask()
    assert mask[..., 3:, :4].all()  # the 4 sink tokens, seen by every query after them
    keys, values = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    scores = (q.double() @ keys.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.allclose(out.double(), torch.softmax(scores, -1) @ values, atol=1e-5)


@pytest.mark.parametrize("params", [dict(k=0), dict(k=100), dict(block_size_q=0), dict(block_size_k=-64),
                                    dict(sink_tokens=-1), dict(window=-1), dict(causal=0)])
def test_bad_parameters(params):
    with pytest.raises((TypeError, ValueError)):
        HiPAttention(**params)


def test_causal_needs_q_len_at_most_k_len():
    with pytest.raises(ValueError, match="q_len"):
        HiPAttention().select(torch.randn(1, 1, 100, 8), torch.randn(1, 1, 50, 8))

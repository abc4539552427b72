"""Basic static layouts against per-position definitions, and random_blocks' density promise."""
import pytest
import torch

from blockattn import patterns


def _positions(q_len, k_len):
    i = torch.arange(q_len).view(-1, 1) + (k_len - q_len)
    j = torch.arange(k_len).view(1, -1)
    return i, j


@pytest.mark.parametrize("q_len,k_len,block", [(100, 100, 16), (37, 100, 32), (1, 77, 16), (100, 60, 64)])
def test_causal_and_full(q_len, k_len, block):
    i, j = _positions(q_len, k_len)
    layout = patterns.causal(q_len, k_len, block_q=block, block_k=block) if q_len <= k_len else None
    if layout is not None:
        assert torch.equal(layout.to_token_mask()[0, 0], j <= i)
    full = patterns.full(q_len, k_len, block_q=block, block_k=block)
    assert full.to_token_mask().all() and full.density() == 1.0


@pytest.mark.parametrize("window,causal", [(1, True), (17, True), (40, True), (9, False), ((3, 12), False)])
def test_sliding_window(window, causal):
    q_len, k_len = 90, 120
    i, j = _positions(q_len, k_len)
    layout = patterns.sliding_window(q_len, k_len, window=window, causal=causal, block_q=16, block_k=16)
    if isinstance(window, tuple):
        expected = (j >= i - window[0]) & (j <= i + window[1])
    elif causal:
        expected = (j <= i) & (j > i - window)
    else:
        expected = (j >= i - window) & (j <= i + window)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    # every listed tile holds at least one allowed pair
    tiles = layout.to_dense()[0, 0]
    allowed = expected.view(-1).new_zeros(tiles.shape)
    for qi, kj in expected.nonzero().tolist():
        allowed[qi // 16, kj // 16] = True
    assert torch.equal(tiles, allowed)


@pytest.mark.parametrize("density", [0.1, 0.35, 1.0])
def test_random_blocks_causal_density_and_diagonal(density):
    L, block = 1024, 64
    layout = patterns.random_blocks(L, density=density, heads=4, seed=3, block_q=block, block_k=block)
    n = L // block
    causal_tiles = n * (n + 1) // 2
    dense = layout.to_dense()[0]
    assert dense.shape == (4, n, n)
    for h in range(4):
        assert int(dense[h].sum()) == max(round(density * causal_tiles), n)
        assert dense[h].diagonal().all()
        assert not dense[h].triu(1).any()
    if density == 0.35:  # above the diagonal-only floor, heads draw different tiles
        assert not torch.equal(dense[0], dense[1])
    assert layout.density("causal") == pytest.approx(max(round(density * causal_tiles), n) / causal_tiles)
    again = patterns.random_blocks(L, density=density, heads=4, seed=3, block_q=block, block_k=block)
    assert torch.equal(again.to_dense(), layout.to_dense())


def test_random_blocks_noncausal_rows_nonempty():
    layout = patterns.random_blocks(300, density=0.05, causal=False, heads=2, block_q=32, block_k=32)
    assert layout.row_has_keys().all()
    with pytest.raises(ValueError, match="density"):
        patterns.random_blocks(300, density=0.0)


def test_per_head_stacks_and_mixes_rules():
    a = patterns.causal(64, block_q=16, block_k=16)
    b = patterns.sliding_window(64, window=8, causal=False, block_q=16, block_k=16)
    stacked = patterns.per_head([a, b])
    assert stacked.heads == 2
    assert torch.equal(stacked.to_token_mask()[0, 0], a.to_token_mask()[0, 0])
    assert torch.equal(stacked.to_token_mask()[0, 1], b.to_token_mask()[0, 0])
    with pytest.raises(ValueError, match="layouts\\[1\\]"):
        patterns.per_head([a, patterns.causal(32)])

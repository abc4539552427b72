"""S2-Attention shards against a per-position loop, and the paper's union property."""
import pytest
import torch

from blockattn import patterns


@pytest.mark.parametrize("q_len,k_len,heads,stride,local,block", [(200, 200, 4, 4, 1, 16), (100, 260, 6, 3, 2, 16),
                                                                  (130, 130, 8, 8, 3, 8), (64, 64, 2, 1, 1, 32),
                                                                  (90, 245, 4, 4, 2, 16)])  # unaligned offset: token path
def test_s2_matches_naive_and_union_is_causal(q_len, k_len, heads, stride, local, block):
    layout = patterns.s2_attention(q_len, k_len, heads=heads, vertical_stride=stride, local_blocks=local,
                                   block_q=block, block_k=block)
    mask = layout.to_token_mask()[0]
    offset = k_len - q_len
    for h in range(heads):
        expected = torch.zeros(q_len, k_len, dtype=torch.bool)
        for i in range(q_len):
            pos = i + offset
            for j in range(pos + 1):
                expected[i, j] = (j // block) % stride == h % stride or pos // block - j // block < local
        assert torch.equal(mask[h], expected)
    causal = torch.arange(k_len).view(1, -1) <= torch.arange(q_len).view(-1, 1) + offset
    assert torch.equal(mask.any(0), causal)  # union over heads = full causal context
    if stride > 1:
        assert all(not torch.equal(mask[h], causal) for h in range(heads)) or k_len <= local * block


def test_s2_errors():
    with pytest.raises(ValueError, match="vertical_stride"):
        patterns.s2_attention(128, heads=2, vertical_stride=4)
    with pytest.raises(ValueError, match="local_blocks"):
        patterns.s2_attention(128, heads=2, vertical_stride=2, local_blocks=0)


def test_engine_over_s2_layout_matches_dense():
    from tests.patterns.helpers import masked_attention
    import blockattn

    layout = patterns.s2_attention(96, 160, heads=4, vertical_stride=4, local_blocks=1, block_q=16, block_k=16)
    q = torch.randn(1, 4, 96, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 4, 160, 8, dtype=torch.float64) for _ in range(2))
    out = blockattn.attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(out, masked_attention(q, k, v, layout.to_token_mask()), rtol=1e-10, atol=1e-10)


def test_s2_unequal_blocks_token_path():
    q_len, k_len, heads, stride, local = 70, 150, 4, 2, 2
    layout = patterns.s2_attention(q_len, k_len, heads=heads, vertical_stride=stride, local_blocks=local,
                                   block_q=32, block_k=16)
    assert layout.tile_masks is not None
    mask = layout.to_token_mask()[0]
    i = torch.arange(q_len).view(-1, 1) + k_len - q_len
    j = torch.arange(k_len).view(1, -1)
    for h in range(heads):
        expected = (j <= i) & (((j // 16) % stride == h % stride) | (i // 16 - j // 16 < local))
        assert torch.equal(mask[h], expected)

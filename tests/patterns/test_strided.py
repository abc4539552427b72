"""S2-Attention shards against a per-position loop, and the paper's union property."""
import pytest
import torch

from blockattn import patterns


def dkernel_mask(heads, k_len, past_len, block, local, stride, kv_heads=None, dense_heads=0, offset=0):
    """DKernel's `get_sparse_attn_mask(..., return_dense=True)` rule (causal, absolute vertical positions),
    written out plainly: bool [heads, k_len - past_len, k_len]."""
    kv_heads = kv_heads or heads
    step = max(1, stride // heads)
    n = -(-k_len // block)
    masks = []
    for g in range(kv_heads):
        for _ in range(heads // kv_heads):
            blocks = torch.zeros(n, n, dtype=torch.bool)
            for qb in range(n):
                for kb in range(qb + 1):
                    sparse = g < kv_heads - dense_heads
                    blocks[qb, kb] = (not sparse) or (kb + g * step + offset) % stride == 0 or qb - kb < local
            dense = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:k_len, :k_len]
            masks.append((dense & torch.ones(k_len, k_len, dtype=torch.bool).tril())[past_len:])
    return torch.stack(masks)


@pytest.mark.parametrize("q_len,k_len,heads,stride,local,block,kv_heads,dense_heads,offset", [
    (200, 200, 4, 4, 1, 16, None, 0, 0), (100, 260, 6, 3, 2, 16, None, 0, 0), (130, 130, 8, 8, 3, 8, None, 0, 1),
    (64, 64, 2, 1, 1, 32, None, 0, 0), (96, 224, 8, 4, 3, 16, None, 0, 0),  # heads 1<->3 differ from kb = h mod vs
    (160, 160, 2, 8, 2, 16, None, 0, 0), (160, 160, 3, 8, 1, 16, None, 0, 1),  # fewer heads than the stride
    (192, 192, 8, 4, 2, 16, 2, 0, 0), (192, 192, 8, 4, 2, 16, 4, 1, 1),  # GQA shards, dense last KV head
    (128, 128, 4, 4, 1, 16, None, 2, 0)])
def test_s2_matches_dkernel(q_len, k_len, heads, stride, local, block, kv_heads, dense_heads, offset):
    layout = patterns.s2_attention(q_len, k_len, heads=heads, vertical_stride=stride, local_blocks=local,
                                   kv_heads=kv_heads, dense_heads=dense_heads, head_offset=offset,
                                   block_q=block, block_k=block)
    mask = layout.to_token_mask()[0]
    expected = dkernel_mask(heads, k_len, k_len - q_len, block, local, stride, kv_heads, dense_heads, offset)
    assert torch.equal(mask, expected)
    if kv_heads:  # query heads of one KV group read the same shard
        size = heads // kv_heads
        assert all(torch.equal(mask[h], mask[h - h % size]) for h in range(heads))
    causal = torch.arange(k_len).view(1, -1) <= torch.arange(q_len).view(-1, 1) + k_len - q_len
    if (kv_heads or heads) - dense_heads >= stride:
        assert torch.equal(mask.any(0), causal)  # union over heads = full causal context


@pytest.mark.parametrize("length,heads,stride,local,block,kv_heads,dense,block_q", [
    (160, 4, 3, 2, 16, None, 0, 16), (130, 4, 4, 1, 8, 2, 1, 8), (130, 4, 4, 1, 8, None, 0, 16)])  # last: token path
def test_s2_bidirectional_matches_dkernel_relative_rule(length, heads, stride, local, block, kv_heads, dense, block_q):
    """DKernel, causal=False: left = max(0, qb - kb - local + 1), right = max(0, kb - qb - local + 1),
    block kept iff (left + right) % stride == 0 (all sparse heads alike); dense heads keep everything."""
    layout = patterns.s2_attention(length, heads=heads, vertical_stride=stride, local_blocks=local,
                                   kv_heads=kv_heads, dense_heads=dense, causal=False, block_q=block_q,
                                   block_k=block)
    mask = layout.to_token_mask()[0]
    n = -(-length // block)
    blocks = torch.zeros(n, n, dtype=torch.bool)
    for qb in range(n):
        for kb in range(n):
            blocks[qb, kb] = (max(0, qb - kb - local + 1) + max(0, kb - qb - local + 1)) % stride == 0
    sparse = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:length, :length]
    group = heads // (kv_heads or heads)
    for h in range(heads):
        is_dense = h // group >= (kv_heads or heads) - dense
        assert torch.equal(mask[h], torch.ones_like(sparse) if is_dense else sparse)
    assert not layout.is_causal()


def test_s2_head_order_is_dkernels():
    """kb + h == 0 (mod vs): head 1 reads blocks 3, 7, ... (not 1, 5, ...) at stride 4; offset 1 shifts by one."""
    rows = patterns.s2_attention(16, heads=4, vertical_stride=4, local_blocks=1, block_q=1, block_k=1).to_dense()
    assert rows[0, 1, -1].nonzero().flatten().tolist() == [3, 7, 11, 15]
    rows = patterns.s2_attention(16, heads=4, vertical_stride=4, local_blocks=1, head_offset=1, block_q=1,
                                 block_k=1).to_dense()
    assert rows[0, 1, -1].nonzero().flatten().tolist() == [2, 6, 10, 14, 15]


def test_s2_errors():
    with pytest.raises(ValueError, match="local_blocks"):
        patterns.s2_attention(128, heads=2, vertical_stride=2, local_blocks=0)
    with pytest.raises(ValueError, match="kv_heads"):
        patterns.s2_attention(128, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="dense_heads"):
        patterns.s2_attention(128, heads=4, kv_heads=2, dense_heads=3)
    with pytest.raises(ValueError, match="head_offset"):
        patterns.s2_attention(128, heads=4, head_offset=0.5)
    with pytest.raises(ValueError, match="q_len == k_len"):
        patterns.s2_attention(64, 128, heads=4, causal=False)
    with pytest.raises(TypeError, match="causal"):
        patterns.s2_attention(64, heads=4, causal=1)


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
        expected = (j <= i) & ((((j // 16) + h) % stride == 0) | (i // 16 - j // 16 < local))
        assert torch.equal(mask[h], expected)

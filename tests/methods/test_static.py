"""Static baselines as registered methods: their layouts equal the patterns, errors name the argument."""
import pytest
import torch

from blockattn import methods, patterns


def qk(q_len=150, k_len=None):
    return torch.randn(1, 6, q_len, 16), torch.randn(1, 2, k_len or q_len, 16)


def masks_equal(a, b):
    return torch.equal(a.to_token_mask(), b.to_token_mask())


def test_registered():
    assert {"dense", "sliding_window", "streaming", "a_shape"} <= set(methods.names())


def test_dense_causal_and_bidirectional():
    q, k = qk(150, 190)
    assert masks_equal(methods.get("dense", block_size=32).select(q, k),
                       patterns.causal(150, 190, block_q=32, block_k=32))
    full = methods.get("dense").select(q, k, causal=False).to_token_mask()
    assert bool(full.all())


def test_windowed_methods_equal_patterns():
    q, k = qk(170)
    assert masks_equal(methods.get("sliding_window", window=40, block_size=32).select(q, k),
                       patterns.sliding_window(170, window=40, block_q=32, block_k=32))
    assert masks_equal(methods.get("streaming", sink=3, window=40, block_size=32).select(q, k),
                       patterns.streaming(170, sink=3, window=40, block_q=32, block_k=32))
    assert masks_equal(methods.get("a_shape", sink=3, window=40, block_size=32).select(q, k),
                       patterns.a_shape(170, sink=3, window=40, block_q=32, block_k=32))
    two_sided = methods.get("sliding_window", window=10, block_size=32).select(q, k, causal=False).to_token_mask()
    i, j = torch.arange(170).view(-1, 1), torch.arange(170).view(1, -1)
    assert torch.equal(two_sided[0, 0], (j - i).abs() <= 10)


def test_paper_defaults():
    assert (methods.get("streaming").sink, methods.get("streaming").window) == (4, 512)
    assert methods.get("sliding_window").window == 512


def test_bad_input():
    with pytest.raises(ValueError, match="window"):
        methods.get("sliding_window", window=0)
    with pytest.raises(ValueError, match="sink"):
        methods.get("streaming", sink=-2)
    with pytest.raises(ValueError, match="block_size"):
        methods.get("dense", block_size=0)
    with pytest.raises(TypeError, match="does not take"):
        methods.get("streaming", threshold=0.9)
    with pytest.raises(ValueError, match="causal layouts only"):
        methods.get("streaming").select(*qk(), causal=False)
    with pytest.raises(ValueError, match="q must"):
        methods.get("dense").select(torch.randn(3, 4), torch.randn(1, 1, 3, 4))

"""Vertical+slash, dilated and global-token layouts against per-position loops."""
import pytest
import torch

from blockattn import patterns


def _loop(q_len, k_len, keep):
    offset = k_len - q_len
    return torch.tensor([[bool(keep(i + offset, j)) for j in range(k_len)] for i in range(q_len)])


@pytest.mark.parametrize("q_len,k_len,block", [(100, 100, 16), (37, 120, 16), (130, 130, 32)])
def test_vertical_slash(q_len, k_len, block):
    vertical, slash = [0, 3, 64, 99], [0, 1, 17, 50]
    layout = patterns.vertical_slash(q_len, k_len, vertical=vertical, slash=slash, block_q=block, block_k=block)
    expected = _loop(q_len, k_len, lambda p, j: j <= p and (j in vertical or p - j in slash))
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    per_head = patterns.vertical_slash(q_len, k_len, vertical=[[0], [5, 6]], slash=[[0], [2]], allow_empty_rows=True, block_q=block,
                                       block_k=block).to_token_mask()[0]
    assert torch.equal(per_head[1], _loop(q_len, k_len, lambda p, j: j <= p and (j in (5, 6) or p - j == 2)))


def test_vertical_slash_empty_rows():
    with pytest.raises(ValueError, match="attends to no key"):
        patterns.vertical_slash(64, vertical=[40], slash=[3], block_q=16, block_k=16)
    layout = patterns.vertical_slash(64, vertical=[40], slash=[3], block_q=16, block_k=16, allow_empty_rows=True)
    assert not layout.row_has_keys()[0, 0, :3].any()


@pytest.mark.parametrize("window,dilation,causal", [(4, 3, True), (5, 2, False), (1, 7, True), (6, 4, False)])
def test_dilated(window, dilation, causal):
    q_len, k_len = 70, 90
    layout = patterns.dilated(q_len, k_len, window=window, dilation=dilation, causal=causal, block_q=16, block_k=16)
    # distance = query - key: window // 2 steps back, the rest ahead
    steps = range(0, window) if causal else range(-(window - 1 - window // 2), window // 2 + 1)
    allowed = {m * dilation for m in steps}
    expected = _loop(q_len, k_len, lambda p, j: (p - j) in allowed)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)


@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens(causal):
    q_len, k_len, g = 50, 80, [0, 31, 77]
    layout = patterns.global_tokens(q_len, k_len, indices=g, causal=causal, block_q=16, block_k=16)
    expected = _loop(q_len, k_len, lambda p, j: (j in g or p in g or j == p) and (not causal or j <= p))
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    local = patterns.sliding_window(q_len, k_len, window=5, causal=False, block_q=16, block_k=16)
    both = (layout | local).to_token_mask()[0, 0]
    assert torch.equal(both, expected | local.to_token_mask()[0, 0])


@pytest.mark.parametrize("fn,kwargs,match", [
    (patterns.vertical_slash, dict(q_len=10, vertical=[10], slash=[0]), "vertical"),
    (patterns.vertical_slash, dict(q_len=10, vertical=[[1], [2], [3]], slash=[[0], [1]]), "per-head"),
    (patterns.vertical_slash, dict(q_len=10, vertical=3, slash=[0]), "vertical"),
    (patterns.dilated, dict(q_len=10, window=0, dilation=1), "window"),
    (patterns.dilated, dict(q_len=10, window=2, dilation=1, causal=None), "causal"),
    (patterns.global_tokens, dict(q_len=10, indices=[-1]), "indices"),
])
def test_errors(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)

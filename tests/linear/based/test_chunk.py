"""BASED: blocked Taylor linear attention vs the recurrence; the window branch vs a dense softmax."""
import math

import pytest
import torch

from blockattn.linear import based, taylor_linear_attention
from blockattn.linear.based import taylor_feature_map
from blockattn.linear.based.naive import taylor_linear_attention_naive
from tests.linear._util import grads, rel_err


def test_feature_map_is_second_order_taylor_of_exp():
    d = 16
    q, k = torch.randn(50, d, dtype=torch.float64), torch.randn(50, d, dtype=torch.float64)
    x = (q * k).sum(-1) / math.sqrt(d)
    assert taylor_feature_map(q).shape == (50, 1 + d + d * d)
    assert torch.allclose((taylor_feature_map(q) * taylor_feature_map(k)).sum(-1), 1 + x + x * x / 2)


@pytest.mark.parametrize("length,block_size", [(70, 16), (33, 64)])
def test_blocked_matches_recurrence(length, block_size):
    q, k = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    v = torch.randn(2, 2, length, 12)
    out = taylor_linear_attention(q, k, v, block_size=block_size)
    ref = taylor_linear_attention_naive(q.double(), k.double(), v.double())
    assert rel_err(out, ref) <= 1e-4


def test_gradients_match_recurrence():
    q, k, v = (torch.randn(1, 2, 40, 4) for _ in range(3))
    probe = torch.randn(1, 2, 40, 4)
    fast = grads(lambda *t: taylor_linear_attention(*t, block_size=16), (q, k, v), probe)
    slow = grads(taylor_linear_attention_naive, [t.double() for t in (q, k, v)], probe.double())
    for a, b in zip(fast, slow):
        assert rel_err(a, b) <= 1e-4


def _dense_window_softmax(q, k, v, window):
    length = q.shape[2]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    allowed = (j <= i) & (j > i - window)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


def test_based_is_linear_plus_window_softmax():
    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    out = based(q, k, v, window=24)
    qd, kd, vd = (t.double() for t in (q, k, v))
    ref = taylor_linear_attention_naive(qd, kd, vd) + _dense_window_softmax(qd, kd, vd, 24)
    assert rel_err(out, ref) <= 1e-4


def test_bad_input():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="feature dims must match"):
        taylor_linear_attention(q, torch.randn(1, 2, 16, 4), q)
    with pytest.raises(ValueError, match="v must have the same head dim"):
        based(q, q, torch.randn(1, 2, 16, 4))
    with pytest.raises(ValueError, match="window must be >= 1"):
        based(q, q, q, window=0)
    with pytest.raises(TypeError, match="window must be an int"):
        based(q, q, q, window=2.5)

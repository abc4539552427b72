"""Block Transformer's engine form vs a per-token loop over the definition; causality."""
import pytest
import torch

from blockattn.linear import block_transformer
from blockattn.linear.block_transformer.naive import block_transformer_naive
from tests.linear._util import grads, rel_err


@pytest.mark.parametrize("length,block_size", [(32, 4), (24, 8), (16, 1)])
def test_forward_matches_naive(length, block_size):
    q, k, v = (torch.randn(2, 2, length, 8) for _ in range(3))
    out = block_transformer(q, k, v, block_size=block_size)
    ref = block_transformer_naive(q.double(), k.double(), v.double(), block_size)
    assert rel_err(out, ref) <= 1e-4


def test_gradients_match_naive():
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    probe = torch.randn(1, 2, 16, 4)
    fast = grads(lambda *t: block_transformer(*t, block_size=4), (q, k, v), probe)
    slow = grads(lambda *t: block_transformer_naive(*t, 4), [t.double() for t in (q, k, v)], probe.double())
    for a, b in zip(fast, slow):
        assert rel_err(a, b) <= 1e-4


def test_future_tokens_do_not_leak():
    q, k, v = (torch.randn(1, 1, 16, 4) for _ in range(3))
    base = block_transformer(q, k, v, block_size=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 9:], v2[:, :, 9:] = torch.randn(1, 1, 7, 4), torch.randn(1, 1, 7, 4)
    assert torch.allclose(block_transformer(q, k2, v2, block_size=4)[:, :, :9], base[:, :, :9])


def test_bad_input():
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match=r"sequence length \(10\) must be a multiple of block_size \(4\)"):
        block_transformer(q, q, q)
    with pytest.raises(ValueError, match="feature dims must match"):
        block_transformer(q, q[..., :2], q, block_size=2)

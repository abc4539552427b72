"""RAT: chunk-parallel form vs the token-by-token recurrence + attention over stored summaries."""
import pytest
import torch

from blockattn.linear import rat
from blockattn.linear.rat.naive import rat_naive
from tests.linear._util import grads, rel_err


def _inputs(length, dim=8):
    q, k, v = (torch.randn(2, 2, length, dim) for _ in range(3))
    return q, k, v, torch.sigmoid(torch.randn(2, 2, length, dim))


@pytest.mark.parametrize("length,chunk_size", [(64, 16), (24, 4), (8, 8)])
def test_forward_matches_naive(length, chunk_size):
    q, k, v, f = _inputs(length)
    out = rat(q, k, v, f, chunk_size=chunk_size)
    ref = rat_naive(*(t.double() for t in (q, k, v, f)), chunk_size=chunk_size)
    assert rel_err(out, ref) <= 1e-4


def test_gradients_match_naive():
    q, k, v, f = _inputs(32, 4)
    probe = torch.randn(2, 2, 32, 4)
    fast = grads(lambda *t: rat(*t, chunk_size=8), (q, k, v, f), probe)
    slow = grads(lambda *t: rat_naive(*t, chunk_size=8), [t.double() for t in (q, k, v, f)], probe.double())
    for name, a, b in zip(["q", "k", "v", "forget"], fast, slow):
        assert rel_err(a, b) <= 1e-4, name


def test_chunk_size_one_is_softmax_attention():
    # With one token per chunk and f = 0 the summaries are the tokens themselves.
    q, k, v, _ = _inputs(20)
    out = rat(q, k, v, torch.zeros_like(k), chunk_size=1)
    mask = torch.ones(20, 20, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask, float("-inf"))
    assert rel_err(out, torch.softmax(scores, -1) @ v) <= 1e-5


def test_bad_input():
    q, k, v, f = _inputs(20)
    with pytest.raises(ValueError, match=r"sequence length \(20\) must be a multiple of chunk_size \(16\)"):
        rat(q, k, v, f)
    with pytest.raises(ValueError, match="forget must lie in"):
        rat(q, k, v, f + 1, chunk_size=4)
    with pytest.raises(ValueError, match="forget must have the shape"):
        rat(q, k, v, f[..., :4], chunk_size=4)
    with pytest.raises(ValueError, match="feature dims must match"):
        rat(q, k[..., :4], v, f, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_chunk_rope_matches_naive_and_depends_on_chunk_distance(chunk_size):
    """Official InterRoPE: q and the summaries turn by their chunk index, applied after the gated scan."""
    from blockattn.linear.rat.naive import rat_naive
    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    f = torch.rand(1, 2, 16, 8, dtype=torch.float64)
    out = rat(q, k, v, f, chunk_size=chunk_size, chunk_rope=True)
    assert torch.allclose(out, rat_naive(q, k, v, f, chunk_size=chunk_size, chunk_rope=True), atol=1e-12)
    assert not torch.allclose(out, rat(q, k, v, f, chunk_size=chunk_size))

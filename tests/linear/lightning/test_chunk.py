"""Blocked Lightning Attention against the token-by-token recurrence (fp32 vs float64)."""
import pytest
import torch

from blockattn.linear import lightning_attention
from blockattn.linear.lightning.naive import lightning_attention_naive
from tests.linear._util import grads, rel_err


def _inputs(b, h, length, dk, dv, dtype=torch.float32):
    q, k = (torch.randn(b, h, length, dk, dtype=dtype) * 0.5 for _ in range(2))
    v = torch.randn(b, h, length, dv, dtype=dtype)
    decay = torch.rand(h, dtype=dtype) * 0.3 + 0.7
    decay[0] = 1.0  # plain causal linear attention is the λ = 1 corner
    return q, k, v, decay


@pytest.mark.parametrize("length,block_size", [(64, 16), (100, 32), (7, 64), (129, 64)])
def test_forward_and_state_match_naive(length, block_size):
    q, k, v, decay = _inputs(2, 3, length, 16, 24)
    out, state = lightning_attention(q, k, v, decay, block_size=block_size, output_final_state=True)
    ref, ref_state = lightning_attention_naive(q.double(), k.double(), v.double(), decay.double())
    assert out.shape == (2, 3, length, 24) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-4
    assert rel_err(state, ref_state) <= 1e-4


def test_gradients_match_naive():
    q, k, v, decay = _inputs(1, 2, 50, 8, 8, dtype=torch.float64)
    probe = torch.randn(1, 2, 50, 8, dtype=torch.float64)
    fast = grads(lambda *t: lightning_attention(*t, block_size=16), (q, k, v, decay), probe)
    slow = grads(lambda *t: lightning_attention_naive(*t)[0], (q, k, v, decay), probe)
    for name, a, b in zip("qkvλ", fast, slow):
        assert rel_err(a, b) <= 1e-4, name


def test_gradients_fp32_match_float64_naive():
    q, k, v, decay = _inputs(1, 2, 40, 8, 8)
    probe = torch.randn(1, 2, 40, 8)
    fast = grads(lambda *t: lightning_attention(*t, block_size=16), (q, k, v, decay), probe)
    slow = grads(lambda *t: lightning_attention_naive(*t)[0], [t.double() for t in (q, k, v, decay)], probe.double())
    for a, b in zip(fast, slow):
        assert rel_err(a, b) <= 1e-4


def test_initial_state_continues_a_split_sequence():
    q, k, v, decay = _inputs(1, 2, 90, 8, 8)
    whole = lightning_attention(q, k, v, decay, block_size=16)
    first, state = lightning_attention(q[:, :, :37], k[:, :, :37], v[:, :, :37], decay, block_size=16,
                                       output_final_state=True)
    second = lightning_attention(q[:, :, 37:], k[:, :, 37:], v[:, :, 37:], decay, block_size=16, initial_state=state)
    assert rel_err(torch.cat([first, second], dim=2), whole) <= 1e-5


def test_small_decay_does_not_overflow():
    q, k, v, _ = _inputs(1, 2, 128, 8, 8)
    decay = torch.tensor([1e-3, 0.05])
    out = lightning_attention(q, k, v, decay, block_size=64)
    ref, _ = lightning_attention_naive(q.double(), k.double(), v.double(), decay.double())
    assert torch.isfinite(out).all() and rel_err(out, ref) <= 1e-4


def test_bad_input():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="decay must have shape"):
        lightning_attention(q, q, q, torch.ones(3))
    with pytest.raises(ValueError, match=r"decay must lie in \(0, 1\]"):
        lightning_attention(q, q, q, torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="decay must be a torch.Tensor"):
        lightning_attention(q, q, q, 0.9)
    with pytest.raises(ValueError, match="feature dims must match"):
        lightning_attention(q, torch.randn(1, 2, 16, 4), q, torch.ones(2))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        lightning_attention(q, q, q, torch.ones(2), block_size=0)
    with pytest.raises(ValueError, match="initial_state must be"):
        lightning_attention(q, q, q, torch.ones(2), initial_state=torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="must have 4 dims"):
        lightning_attention(q[0], q[0], q[0], torch.ones(2))


def test_matches_the_official_masked_reference_with_alibi_slopes():
    """lightning-attention's `linear_attn`: o = ((q kᵀ) ⊙ M) v with M[t, s] = exp(−slope·(t − s)) for t ≥ s,
    slopes of 8 heads 1/2 .. 1/256 (`_build_slope_tensor`); the op takes λ = exp(−slope). n = 913 is not a
    multiple of the block."""
    n, heads = 913, 8
    q, k, v = (torch.randn(1, heads, n, 8, dtype=torch.float64) * 0.3 for _ in range(3))
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(heads)], dtype=torch.float64)
    t = torch.arange(n, dtype=torch.float64)
    gap = t[:, None] - t[None]
    mask = torch.exp(-slopes.view(-1, 1, 1) * gap.clamp(min=0)) * (gap >= 0)
    expected = ((q @ k.transpose(-1, -2)) * mask) @ v
    out = lightning_attention(q, k, v, torch.exp(-slopes), block_size=64)
    assert rel_err(out, expected) <= 1e-12

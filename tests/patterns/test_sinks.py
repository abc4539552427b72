"""streaming / a_shape against per-position definitions on random sizes."""
import random

import pytest
import torch

from blockattn import attention, patterns
from blockattn.ops import reference  # noqa: F401  (the oracle backend must exist)


def naive_streaming(q_len, k_len, sink, window):
    i = torch.arange(q_len).view(-1, 1) + (k_len - q_len)
    j = torch.arange(k_len).view(1, -1)
    return (j <= i) & ((j < sink) | (j > i - window))


def naive_a_shape(q_len, k_len, sink, window, block_q, block_k):
    offset = k_len - q_len
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for qb in range(-(-q_len // block_q)):
        rows = range(qb * block_q, min(q_len, (qb + 1) * block_q))
        wanted = set()
        for r in rows:
            i = r + offset
            wanted |= {j // block_k for j in range(k_len) if j <= i and (j > i - window)}
        wanted |= {j // block_k for j in range(min(sink, k_len))}
        for r in rows:
            for kb in wanted:
                for j in range(kb * block_k, min(k_len, (kb + 1) * block_k)):
                    mask[r, j] = j <= r + offset
    return mask


@pytest.mark.parametrize("trial", range(8))
def test_streaming_equals_definition(trial):
    rng = random.Random()
    q_len = rng.randint(1, 300)
    k_len = q_len + rng.choice([0, 0, rng.randint(1, 200)])
    sink, window = rng.randint(1, 90), rng.randint(1, 160)
    block = rng.choice([16, 32, 64])
    layout = patterns.streaming(q_len, k_len, sink=sink, window=window, block_q=block, block_k=block)
    assert torch.equal(layout.to_token_mask()[0, 0], naive_streaming(q_len, k_len, sink, window))


@pytest.mark.parametrize("trial", range(4))
def test_a_shape_equals_definition(trial):
    rng = random.Random()
    q_len = rng.randint(1, 160)
    k_len = q_len + rng.choice([0, rng.randint(1, 60)])
    sink, window, block = rng.randint(1, 40), rng.randint(1, 80), rng.choice([16, 32])
    layout = patterns.a_shape(q_len, k_len, sink=sink, window=window, block_q=block, block_k=block)
    expected = naive_a_shape(q_len, k_len, sink, window, block, block)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)
    # block granular: a superset of the token-exact StreamingLLM rule
    assert bool((expected | ~naive_streaming(q_len, k_len, sink, window)).all())


def test_engine_over_streaming_equals_float64_masked_softmax():
    q, k, v = (torch.randn(1, 4, 200, 16) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    layout = patterns.streaming(200, sink=5, window=37, block_q=32, block_k=32)
    out = attention(q, k, v, layout)
    mask = naive_streaming(200, 200, 5, 37)
    keys, values = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    scores = (q.double() @ keys.transpose(-1, -2)) * 16 ** -0.5
    expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ values
    assert float((out.double() - expected).norm() / expected.norm()) <= 1e-5


@pytest.mark.parametrize("fn", [patterns.streaming, patterns.a_shape])
def test_bad_arguments(fn):
    with pytest.raises(ValueError, match="sink"):
        fn(100, sink=0, window=8)
    with pytest.raises(ValueError, match="window"):
        fn(100, sink=4, window=-1)
    with pytest.raises(ValueError, match="q_len"):
        fn(0, sink=4, window=8)

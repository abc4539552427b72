"""SnapKV: the last window_size queries vote, pooled over kernel_size, averaged over each GQA group."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from blockattn import kv  # noqa: E402


def naive_scores(q, k, window, kernel):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    out = torch.zeros(b, hkv, n - window, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            votes = torch.zeros(n - window, dtype=torch.float64)
            for i in range(n - window, n):
                logits = torch.tensor([float(q[bi, h, i] @ k[bi, h // g, j]) / math.sqrt(d) for j in range(i + 1)])
                votes += logits.softmax(0)[: n - window].double() / window
            pooled = torch.tensor([sum(votes[j + o] for o in range(-(kernel // 2), kernel // 2 + 1)
                                       if 0 <= j + o < n - window) / kernel for j in range(n - window)])
            out[bi, h // g] += pooled / g
    return out


def test_scores_and_selection_match_the_naive_rule():
    q, k = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8)
    policy = kv.get("snapkv", ratio=0.5, window_size=6, kernel_size=3)
    scores = policy.score(0, q, k, k, 8 ** -0.5)
    expected = naive_scores(q, k, 6, 3)
    assert torch.allclose(scores[..., :-6].double(), expected, atol=1e-6)
    assert bool(torch.isinf(scores[..., -6:]).all())
    chosen = policy.select(0, q, k, k, 8 ** -0.5)
    for h, index in enumerate(chosen.keep):
        top = sorted(expected[0, h].topk(15 - 6).indices.tolist() + list(range(24, 30)))
        assert index[0].tolist() == top

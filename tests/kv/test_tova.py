"""TOVA: the newest query's head-averaged attention ranks the cache, one selection per layer, bounded."""
import math

import pytest
import torch

pytest.importorskip("transformers")

from blockattn import kv  # noqa: E402
from blockattn.kv.cache import KVLayer  # noqa: E402


def naive_votes(q_last, keys):
    """q_last [Hq, D], keys [Hkv, n, D] -> mean over query heads of softmax(q·k/√d)."""
    hq, d = q_last.shape
    g = hq // keys.shape[0]
    probs = [torch.softmax(torch.tensor([float(q_last[h] @ keys[h // g, j]) / math.sqrt(d)
                                         for j in range(keys.shape[1])]), 0) for h in range(hq)]
    return torch.stack(probs).mean(0)


def test_prefill_keeps_the_top_head_averaged_attention():
    q, k = torch.randn(1, 4, 25, 8), torch.randn(1, 2, 25, 8)
    chosen = kv.get("tova", ratio=0.6).select(0, q, k, k, 8 ** -0.5)
    votes = naive_votes(q[0, :, -1], k[0])
    expected = sorted(votes[:-1].topk(10 - 1).indices.tolist() + [24])
    assert all(index[0].tolist() == expected for index in chosen.keep)


def test_decode_evicts_the_least_attended_token():
    state = KVLayer()
    keys = torch.randn(1, 2, 12, 8)
    state.store([torch.arange(12)[None]] * 2, [keys[:, 0], keys[:, 1]], [keys[:, 0], keys[:, 1]], [None, None],
                [10, 10])
    q = torch.randn(1, 4, 1, 8)
    kv.get("tova", ratio=0.5).after_attend(None, state, 0, q, 8 ** -0.5)
    votes = naive_votes(q[0, :, 0], keys[0])
    votes[-1] = float("inf")
    expected = sorted(votes.topk(10).indices.tolist())
    assert [p[0].tolist() for p in state.positions] == [expected, expected]

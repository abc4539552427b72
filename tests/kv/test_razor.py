"""RazorAttention: echo/induction head scores on the repeated random probe, the global head choice, the
compensation token (eq. 5) and the compressed decode against the float64 oracle."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, kv  # noqa: E402
from blockattn.kv import razor  # noqa: E402
from blockattn.kv.base import attend_head  # noqa: E402
from tests.kv.common import VOCAB, Oracle, decode, rel, tiny_llama  # noqa: E402


def naive_echo_induction(attn, period, offset):
    """attn [Hq, L, L] probabilities -> per-head mean A[i, i-mR] and A[i, i-mR+1] (copies 2..4)."""
    echo, induction = [], []
    for h in range(attn.shape[0]):
        e, ind = [], []
        for copy in range(1, 4):
            for i in range(offset + copy * period, offset + (copy + 1) * period):
                for m in range(1, copy + 1):
                    e.append(float(attn[h, i, i - m * period]))
                    ind.append(float(attn[h, i, i - m * period + 1]))
        echo.append(sum(e) / len(e))
        induction.append(sum(ind) / len(ind))
    return torch.tensor(echo), torch.tensor(induction)


def test_scores_match_the_attention_matrix():
    period, offset, d = 7, 1, 8
    n = offset + 4 * period
    q, k = torch.randn(1, 4, n, d), torch.randn(1, 2, n, d)
    echo, induction = razor.echo_induction(q, k, period, offset, d ** -0.5)
    logits = q[0] @ k[0].repeat_interleave(2, 0).transpose(-1, -2) / math.sqrt(d)
    attn = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    e, i = naive_echo_induction(attn, period, offset)
    assert torch.allclose(echo, e, atol=1e-6) and torch.allclose(induction, i, atol=1e-6)


def test_probe_on_a_model_and_head_choice():
    model = tiny_llama(layers=3, kv_heads=2)
    policy = kv.get("razor", ratio=0.5, probe_period=12, induction_ratio=0.34, echo_ratio=0.17)
    with hf.patch(model, kv=policy):
        pass
    ids = razor.probe_ids(VOCAB, 12, 2025, model.config.bos_token_id)
    eager = transformers.LlamaForCausalLM(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(ids, output_attentions=True).attentions
    echo, induction = policy.scores
    for layer, attn in enumerate(attentions):
        e, i = naive_echo_induction(attn[0], 12, 1)
        assert torch.allclose(echo[layer], e.view(2, 2).amax(1), atol=1e-5)
        assert torch.allclose(induction[layer], i.view(2, 2).amax(1), atol=1e-5)
    flat_i, flat_e = induction.flatten(), echo.flatten()
    expected = {divmod(int(j), 2) for j in flat_i.topk(2).indices} | {divmod(int(flat_e.argmax()), 2)}
    assert set(policy.retrieval_heads) == expected


def test_compensation_token_is_eq5():
    d, n_keep, n_drop = 8, 10, 30
    q = torch.randn(1, 3, 2, d, dtype=torch.float64)
    k, v = torch.randn(1, n_keep, d, dtype=torch.float64), torch.randn(1, n_keep, d, dtype=torch.float64)
    k_hat, v_hat = torch.randn(1, d, dtype=torch.float64), torch.randn(1, d, dtype=torch.float64)
    out = attend_head(q, k, v, d ** -0.5, comp=(k_hat, v_hat, torch.tensor([float(n_drop)])))
    for g in range(3):
        for r in range(2):
            visible = n_keep - 2 + r + 1
            w = (q[0, g, r] @ k[0, :visible].T / math.sqrt(d)).exp()
            w_hat = n_drop * (q[0, g, r] @ k_hat[0] / math.sqrt(d)).exp()
            expected = (w @ v[0, :visible] + w_hat * v_hat[0]) / (w.sum() + w_hat)
            assert torch.allclose(out[0, g, r], expected, atol=1e-10)
    # identical dropped keys: the slot is exact, i.e. full attention over all the tokens
    k_same = torch.randn(1, 1, d, dtype=torch.float64)
    v_drop = torch.randn(1, n_drop, d, dtype=torch.float64)
    full_k = torch.cat([k_same.expand(1, n_drop, d), k], 1)
    full_v = torch.cat([v_drop, v], 1)
    exact = attend_head(q, full_k, full_v, d ** -0.5)
    merged = attend_head(q, k, v, d ** -0.5, comp=(k_same[:, 0], v_drop.mean(1), torch.tensor([float(n_drop)])))
    assert torch.allclose(merged, exact, atol=1e-10)


def test_compressed_decode_equals_oracle_with_compensation():
    model = tiny_llama(layers=2, kv_heads=2)
    n = 150
    ids = torch.randint(0, VOCAB, (1, n))
    policy = kv.get("razor", ratio=0.6, sink=4, retrieval_heads=[(0, 1)])
    logits, fed, attended, cache = decode(model, ids, 5, policy)
    assert cache.lengths()[0][1] == n + 5 and cache.lengths()[0][0] < n
    compensated = [[None, None], [None, None]]
    for layer in (0, 1):
        for h in (0, 1):
            if (layer, h) != (0, 1):
                kept = set(attended[0][layer][h])
                compensated[layer][h] = [j for j in range(n) if j not in kept]
                assert float(cache.layers[layer].comp_counts[h]) == len(compensated[layer][h])
    expected = Oracle(model).logits(ids, fed, attended, compensated)
    assert rel(logits, expected) < 1e-5
    no_slot = Oracle(model).logits(ids, fed, attended)
    assert rel(no_slot, expected) > 1e-4
    # the paper's default window max(S_0, N/C) keeps everything at this length
    with torch.no_grad(), hf.patch(model, kv=kv.get("razor", retrieval_heads=[])):
        assert model(ids, use_cache=True).past_key_values.lengths() == [[n, n], [n, n]]

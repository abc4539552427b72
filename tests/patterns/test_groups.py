"""Structured group masks against a cell-by-cell loop, and DreamVLA's four rules."""
import pytest
import torch

from blockattn import patterns


def test_group_layout_matches_naive():
    groups = [("text", 5), ("dyn", 3), ("depth", 4), ("sem", 2), ("act", 6)]
    allowed = {("text", "text"): "causal", ("dyn", "text"): "full", ("depth", "text"): "full",
               ("sem", "text"): "full", ("act", "text"): "full", ("act", "dyn"): "full", ("act", "act"): "causal"}
    layout = patterns.group_layout(groups, allowed, block_q=4, block_k=4, allow_empty_rows=True)
    names = [n for n, size in groups for _ in range(size)]
    L = len(names)
    expected = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            mode = allowed.get((names[i], names[j]))
            expected[i, j] = mode == "full" or (mode == "causal" and j <= i)
    assert torch.equal(layout.to_token_mask()[0, 0], expected)


def test_dreamvla_rules():
    dream = {"dynamic": 2, "depth": 3, "semantic": 2}
    ctx, act, T = 4, 3, 3
    layout = patterns.dreamvla(T, context_len=ctx, dream=dream, action_len=act, block_q=8, block_k=8)
    mask = layout.to_token_mask()[0, 0]
    labels = []  # (timestep, part) per token
    for t in range(T):
        labels += [(t, "context")] * ctx + [(t, name) for name, n in dream.items() for _ in range(n)] + [(t, "action")] * act
    for i, (ti, pi) in enumerate(labels):
        for j, (tj, pj) in enumerate(labels):
            if tj > ti:  # rule 1: block-causal across timesteps
                assert not mask[i, j]
            elif pj != "context":  # rule 2: query tokens are never keys ... (rule 3) except dream -> action
                assert mask[i, j] == (pi == "action" and pj in dream and tj == ti)
            elif pi == "context":
                assert mask[i, j] == (j <= i)
            else:
                assert mask[i, j]


@pytest.mark.parametrize("groups,allowed,match", [
    ([("a", 2), ("a", 3)], [("a", "a")], "unique"),
    ([("a", 0)], [("a", "a")], "length"),
    ([("a", 2)], [("a", "b")], "name two groups"),
    ([("a", 2)], {("a", "a"): "sometimes"}, "mode"),
    ([], [], "non-empty"),
    ([("a", 2)], 5, "allowed"),
])
def test_group_errors(groups, allowed, match):
    with pytest.raises(ValueError, match=match):
        patterns.group_layout(groups, allowed)


def test_empty_rows_rejected_unless_asked():
    with pytest.raises(ValueError, match="attends to no key"):
        patterns.group_layout([("a", 2), ("b", 2)], [("a", "a")])


def test_engine_over_group_layout_matches_dense():
    from tests.patterns.helpers import masked_attention
    import blockattn

    layout = patterns.dreamvla(2, context_len=7, dream={"a": 3, "b": 2}, action_len=4, block_q=8, block_k=8)
    q, k, v = (torch.randn(2, 2, layout.q_len, 8, dtype=torch.float64) for _ in range(3))
    out = blockattn.attention(q, k, v, layout, backend="torch")
    torch.testing.assert_close(out, masked_attention(q, k, v, layout.to_token_mask()), rtol=1e-10, atol=1e-10)

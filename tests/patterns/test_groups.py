"""Structured group masks against a cell-by-cell loop, and DreamVLA against its official `generate_attention_mask`."""
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


def official_dreamvla_mask(K, num_A, num_B, num_obs, action, only_obs=False, proprio=False, goal=0, hidden=None):
    """DreamVLA's `generate_attention_mask(...) == 0` (models/dreamvla_model.py), written out plainly:
    True = may attend. `hidden[i]`: dream token indices hidden from step i's actions (mask_l_obs_ratio)."""
    L = (num_A + num_B) * K
    keep = torch.ones(L, L, dtype=torch.bool)
    for i in range(K):
        s, e = i * (num_A + num_B), (i + 1) * (num_A + num_B)
        dream, act = s + num_A, s + num_A + num_obs
        keep[s:e, e:] = False
        keep[:, dream:e] = False
        keep[act:act + action, dream:act] = True
        if only_obs:
            keep[act:act + action] = False
            keep[act:act + action, s + 2:s + num_A] = True
            keep[act:act + action, dream:act] = True
            if proprio:
                keep[act:act + action, s + 1] = True
            for j in (hidden or {}).get(i, ()):
                keep[act:act + action, dream + j] = False
        if goal and i < K - goal:
            keep[dream:act, (i + goal) * (num_A + num_B) + 1] = True
    return keep


@pytest.mark.parametrize("options", [{}, {"atten_only_obs": True}, {"atten_only_obs": True,
                                     "attn_robot_proprio_state": True}, {"atten_goal": 1}, {"atten_goal": 2},
                                     {"atten_only_obs": True, "attn_robot_proprio_state": True, "atten_goal": 1}])
def test_dreamvla_matches_official_mask(options):
    dream = {"dynamic": 4, "depth": 2, "semantic": 3}
    ctx, act, T = 5, 2, 3
    layout = patterns.dreamvla(T, context_len=ctx, dream=dream, action_len=act, block_q=8, block_k=8, **options)
    expected = official_dreamvla_mask(T, ctx, 9 + act, 9, act, options.get("atten_only_obs", False),
                                      options.get("attn_robot_proprio_state", False), options.get("atten_goal", 0))
    assert torch.equal(layout.to_token_mask()[0, 0], expected)


def test_dreamvla_default_context_is_bidirectional_within_a_step():
    mask = patterns.dreamvla(2, context_len=4, dream={"a": 2}, action_len=1, block_q=4, block_k=4).to_token_mask()[0, 0]
    assert mask[0, :4].all() and mask[7, :4].all() and not mask[0, 4:].any()  # step 0: context 0..3 sees 0..3


def test_dreamvla_hidden_dream_keys():
    dream, ctx, act, T = {"dynamic": 4, "depth": 4}, 4, 3, 3
    layout = patterns.dreamvla(T, context_len=ctx, dream=dream, action_len=act, atten_only_obs=True,
                               mask_l_obs_ratio=0.25, generator=torch.Generator().manual_seed(1), block_q=8, block_k=8)
    mask = layout.to_token_mask()[0, 0]
    step = ctx + 8 + act
    hidden = {}
    for i in range(T):
        seen = mask[i * step + ctx + 8, i * step + ctx:i * step + ctx + 8]
        hidden[i] = (~seen).nonzero().flatten().tolist()
        assert len(hidden[i]) == 2  # int(0.25 * 8) per step
    assert torch.equal(mask, official_dreamvla_mask(T, ctx, 8 + act, 8, act, True, hidden=hidden))


def test_dreamvla_errors():
    with pytest.raises(ValueError, match="atten_only_obs"):
        patterns.dreamvla(2, context_len=4, dream={"a": 2}, action_len=1, mask_l_obs_ratio=0.5)
    with pytest.raises(ValueError, match="context_len"):
        patterns.dreamvla(2, context_len=2, dream={"a": 2}, action_len=1, atten_only_obs=True)
    with pytest.raises(ValueError, match="atten_goal"):
        patterns.dreamvla(2, context_len=4, dream={"a": 2}, action_len=1, atten_goal=-1)
    with pytest.raises(TypeError, match="atten_only_obs"):
        patterns.dreamvla(2, context_len=4, dream={"a": 2}, action_len=1, atten_only_obs=1)


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

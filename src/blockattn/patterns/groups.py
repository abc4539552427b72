"""Structured group masks: named token groups and a table of which group may attend to which.

Zhang et al., "DreamVLA" (arXiv 2507.04447), block-wise structured attention: the dynamic-region,
depth and semantic "dream" queries are mutually masked so their representations stay disentangled,
no token attends to any query token, a timestep's action queries read its dream queries, and a
timestep's context tokens attend to each other bidirectionally.

Rule (`group_layout`): the sequence is a list of contiguous named groups; query token i of group
G sees key token j of group H iff the pair (G, H) is allowed, either fully or causally (`j <= i`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from blockattn.layout import BlockLayout, _cdiv, _check_positive_int
from blockattn.patterns._grid import tile_layout

__all__ = ["group_layout", "dreamvla"]

_MODES = {"full": 1, "causal": 2}


def group_layout(groups: Sequence[tuple[str, int]], allowed, *, block_q: int = 64, block_k: int = 64,
                 allow_empty_rows: bool = False) -> BlockLayout:
    """Layout from named groups and an allowed-pairs table.

    Args:
        groups: `[(name, length), ...]` in sequence order; names unique, lengths >= 1.
        allowed: `{(query_group, key_group): "full" | "causal"}`, or an iterable of pairs (all "full").
    """
    if not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError("groups must be a non-empty list of (name, length) pairs")
    names, lengths = [], []
    for entry in groups:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"groups entries must be (name, length) pairs, got {entry!r}")
        names.append(entry[0])
        lengths.append(_check_positive_int(f"length of group {entry[0]!r}", entry[1]))
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got {names}")
    if isinstance(allowed, Mapping):
        pairs = dict(allowed)
    elif isinstance(allowed, Iterable) and not isinstance(allowed, (str, bytes)):
        pairs = {tuple(p): "full" for p in allowed}
    else:
        raise ValueError("allowed must be a mapping {(query_group, key_group): 'full'|'causal'} or pairs")
    index = {n: g for g, n in enumerate(names)}
    table = torch.zeros(len(names), len(names), dtype=torch.long)
    for pair, mode in pairs.items():
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(p in index for p in pair)):
            raise ValueError(f"allowed pair {pair!r} must name two groups among {names}")
        if mode not in _MODES:
            raise ValueError(f"allowed mode for {pair} must be 'full' or 'causal', got {mode!r}")
        table[index[pair[0]], index[pair[1]]] = _MODES[mode]
    starts = torch.tensor([0] + lengths).cumsum(0)
    length = int(starts[-1])
    group_of = torch.arange(len(names)).repeat_interleave(torch.tensor(lengths))
    n_q, n_k = _cdiv(length, block_q), _cdiv(length, block_k)
    candidates = torch.zeros(1, n_q, n_k, dtype=torch.bool)
    for g, h in table.nonzero().tolist():
        candidates[0, int(starts[g]) // block_q:(int(starts[g + 1]) - 1) // block_q + 1,
                   int(starts[h]) // block_k:(int(starts[h + 1]) - 1) // block_k + 1] = True

    def rule(h, q_idx, k_idx):
        mode = table[group_of[q_idx], group_of[k_idx]]
        return (mode == 1) | ((mode == 2) & (k_idx <= q_idx))

    return tile_layout(length, length, block_q, block_k, candidates, rule, allow_empty_rows=allow_empty_rows)


def dreamvla(timesteps: int, *, context_len: int, dream: Mapping[str, int], action_len: int,
             atten_only_obs: bool = False, attn_robot_proprio_state: bool = False, atten_goal: int = 0,
             mask_l_obs_ratio: float = 0.0, generator: torch.Generator | None = None,
             block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """DreamVLA's mask over `timesteps` steps, each `[context (text, state, image) | dream queries | action queries]`.

    Default rules (the official `generate_attention_mask` as the finetune and eval scripts call it;
    the model's GPT-2 applies no causal mask of its own when a mask is given): context tokens see the
    whole context of their own step (bidirectional) and of earlier steps, never a query token; dream
    queries see the context of their own and earlier steps only (not each other, not themselves: the
    groups stay disentangled); action queries see that context plus their own step's dream queries.
    Dream query tokens have no key in their own group, so they rely on the context (never empty).

    The pretraining options (the official flags; `context` is then `[text, state, image...]`, as
    the official `num_A = 1 + 1 + image tokens`, so `context_len >= 3`):
        atten_only_obs: action queries see only their own step's image tokens and dream queries.
        attn_robot_proprio_state: with `atten_only_obs`, they also see their own step's state token.
        mask_l_obs_ratio: with `atten_only_obs`, `int(ratio * dream tokens)` dream keys per step,
            drawn at random (`generator`), are hidden from the action queries. The official model
            redraws them every pretraining forward: build a new layout per forward to match.
        atten_goal: dream queries of step t also see the state token of step `t + atten_goal` (a
            deliberate look-ahead; the official `atten_goal=n, atten_goal_state=True`, and without
            `atten_goal_state` the official flag changes nothing). 0 = off.
    DreamVLA's `share_query` is one dream group: `dream={"shared": n}`.
    """
    timesteps = _check_positive_int("timesteps", timesteps)
    context_len = _check_positive_int("context_len", context_len)
    action_len = _check_positive_int("action_len", action_len)
    if not isinstance(dream, Mapping) or not dream:
        raise ValueError("dream must be a non-empty mapping {group name: number of query tokens}")
    for name, flag in (("atten_only_obs", atten_only_obs), ("attn_robot_proprio_state", attn_robot_proprio_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(atten_goal, bool) or not isinstance(atten_goal, int) or atten_goal < 0:
        raise ValueError(f"atten_goal must be an int >= 0, got {atten_goal!r}")
    if isinstance(mask_l_obs_ratio, bool) or not isinstance(mask_l_obs_ratio, (int, float)) \
            or not 0.0 <= mask_l_obs_ratio <= 1.0:
        raise ValueError(f"mask_l_obs_ratio must be a float in [0, 1], got {mask_l_obs_ratio!r}")
    if (attn_robot_proprio_state or mask_l_obs_ratio > 0) and not atten_only_obs:
        raise ValueError("attn_robot_proprio_state and mask_l_obs_ratio only act with atten_only_obs=True "
                         "(as in the official mask)")
    split = atten_only_obs or atten_goal > 0
    if split and context_len < 3:
        raise ValueError(f"atten_only_obs / atten_goal need context = [text, state, image...], so context_len "
                         f">= 3, got {context_len}")
    dream_tokens = sum(_check_positive_int(f"dream[{name!r}]", n) for name, n in dream.items())
    dropped_count = int(mask_l_obs_ratio * dream_tokens)

    groups, allowed = [], {}
    ctx, state, image, dream_groups = [], [], [], []  # group names per step
    for t in range(timesteps):
        if split:
            parts = [(f"{t}:text", 1), (f"{t}:state", 1), (f"{t}:image", context_len - 2)]
            state.append(f"{t}:state")
            image.append(f"{t}:image")
        else:
            parts = [(f"{t}:context", context_len)]
        ctx.append([name for name, _ in parts])
        groups += parts
        # hidden dream keys split their group into one group per token
        dropped = set(torch.randperm(dream_tokens, generator=generator)[:dropped_count].tolist())
        step_dream, at = [], 0
        for name, n in dream.items():
            if dropped:
                parts = [(f"{t}:{name}:{i}", 1) for i in range(n)]
                step_dream += [(f"{t}:{name}:{i}", at + i in dropped) for i in range(n)]
            else:
                parts = [(f"{t}:{name}", n)]
                step_dream.append((f"{t}:{name}", False))
            groups += parts
            at += n
        dream_groups.append(step_dream)
        groups.append((f"{t}:action", action_len))
    for t in range(timesteps):
        readers = ctx[t] + [name for name, _ in dream_groups[t]]
        for past in range(t + 1):
            for key in ctx[past]:
                for reader in readers:
                    allowed[(reader, key)] = "full"
                if not atten_only_obs:
                    allowed[(f"{t}:action", key)] = "full"
        for name, hidden in dream_groups[t]:
            if not hidden:
                allowed[(f"{t}:action", name)] = "full"
        if atten_only_obs:
            allowed[(f"{t}:action", image[t])] = "full"
            if attn_robot_proprio_state:
                allowed[(f"{t}:action", state[t])] = "full"
        if atten_goal and t + atten_goal < timesteps:
            for name, _ in dream_groups[t]:
                allowed[(name, state[t + atten_goal])] = "full"
    return group_layout(groups, allowed, block_q=block_q, block_k=block_k)

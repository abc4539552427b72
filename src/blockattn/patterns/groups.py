"""Structured group masks: named token groups and a table of which group may attend to which.

Zhang et al., "DreamVLA" (arXiv 2507.04447), block-wise structured attention: the dynamic-region,
depth and semantic "dream" queries are mutually masked so their representations stay disentangled,
no token attends to any query token, and a timestep's action queries read its dream queries.

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
             block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """DreamVLA's mask over `timesteps` steps, each `[context (text, state, image) | dream queries | action queries]`.

    Rules (from the official `generate_attention_mask`): context tokens are causal across the
    sequence and never see query tokens; dream queries see the context of their own and earlier
    steps only (not each other, not themselves: the groups stay disentangled); action queries see
    that context plus their own step's dream queries. Dream query tokens have no key at all in
    their own group, so they rely on the context (which is never empty).
    """
    timesteps = _check_positive_int("timesteps", timesteps)
    if not isinstance(dream, Mapping) or not dream:
        raise ValueError("dream must be a non-empty mapping {group name: number of query tokens}")
    groups, allowed = [], {}
    for t in range(timesteps):
        ctx = f"{t}:context"
        groups.append((ctx, context_len))
        groups += [(f"{t}:{name}", n) for name, n in dream.items()]
        groups.append((f"{t}:action", action_len))
        for past in range(t + 1):
            past_ctx = f"{past}:context"
            allowed[(ctx, past_ctx)] = "causal" if past == t else "full"
            for name in dream:
                allowed[(f"{t}:{name}", past_ctx)] = "full"
            allowed[(f"{t}:action", past_ctx)] = "full"
        for name in dream:
            allowed[(f"{t}:action", f"{t}:{name}")] = "full"
    return group_layout(groups, allowed, block_q=block_q, block_k=block_k)

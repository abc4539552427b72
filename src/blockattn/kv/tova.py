"""TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024; kvpress's TOVAPress for the prefill).

Rule: one selection per layer. After prefill, the last query's attention averaged over all heads scores
every earlier token; the top int(n·(1 − ratio)) are kept (the last token always). While decoding the
cache stays at that size: after each step the token with the lowest head-averaged attention from the
newest query is evicted (the newest token never).
"""
from __future__ import annotations

import dataclasses

import torch

from blockattn.kv import register
from blockattn.kv.base import ScorerPolicy, Selection, head_probs, window_probs


@register("tova")
@dataclasses.dataclass
class TOVA(ScorerPolicy):
    def score(self, layer, query, key, value, scale):
        probs = window_probs(query, key, 1, scale)[:, :, 0, :-1]   # [B, Hq, n - 1]
        votes = probs.mean(1, keepdim=True).expand(-1, key.shape[1], -1)
        return torch.cat([votes, votes.new_full((*votes.shape[:2], 1), float("inf"))], dim=-1)

    def select(self, layer, query, key, value, scale):
        chosen = super().select(layer, query, key, value, scale)
        return Selection(chosen.keep, capacity=[k.shape[1] for k in chosen.keep] if self.ratio > 0 else None)

    def after_attend(self, cache, state, layer, query, scale):
        if not state.capacity or state.capacity[0] is None:
            return
        n, cap = state.head_keys[0].shape[1], state.capacity[0]
        if n <= cap:
            return
        heads = len(state.head_keys)
        group = query.shape[1] // heads
        last = query[:, :, -1:]
        votes = torch.stack([head_probs(last[:, h * group:(h + 1) * group], state.head_keys[h], scale)[:, :, 0]
                             for h in range(heads)], 1).mean((1, 2))   # [B, n]
        votes[:, -1] = float("inf")
        index = votes.topk(cap, dim=-1).indices.sort(dim=-1).values
        for h in range(heads):
            state.keep(h, index)

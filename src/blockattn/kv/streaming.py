"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024).

Rule: every KV head keeps the first `sink` tokens (attention sinks) and the most recent tokens, the
budget int(n·(1 − ratio)) counting both; while decoding the cache stays at that size, the oldest non-sink
token evicted as each new one arrives. With `window` given and `ratio = 0`, the cache is `sink + window`
tokens, the paper's fixed-size setting. kvpress's StreamingLLMPress is the prefill half of this rule.
"""
from __future__ import annotations

import dataclasses

import torch

from blockattn.kv import register
from blockattn.kv.base import Policy, Selection, budget, check_int, check_ratio


@register("streaming")
@dataclasses.dataclass
class StreamingLLM(Policy):
    ratio: float = 0.0
    sink: int = 4
    window: int | None = None

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)
        check_int("sink", self.sink, 0)
        if self.window is not None:
            check_int("window", self.window, 1)

    def capacity(self, n: int) -> int:
        kept = budget(n, self.ratio)
        if self.ratio == 0:
            if self.window is None:
                return n
            kept = self.sink + self.window
        need = self.sink + (self.window or 1)
        if kept < need:
            raise ValueError(f"streaming: a budget of {kept} tokens (int({n}·(1 − ratio={self.ratio}))) is smaller "
                             f"than sink + window = {self.sink} + {self.window or 1}")
        return kept

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        kept = self.capacity(n)
        index = _sink_and_recent(n, self.sink, kept, key.device).expand(batch, -1)
        bounded = self.ratio > 0 or self.window is not None
        return Selection([index] * heads, capacity=[kept if bounded else None] * heads)

    def after_attend(self, cache, state, layer, query, scale):
        for h, cap in enumerate(state.capacity):
            n = state.head_keys[h].shape[1]
            if cap is not None and n > cap:
                state.keep(h, _sink_and_recent(n, self.sink, cap, query.device).expand(query.shape[0], -1))


def _sink_and_recent(n: int, sink: int, kept: int, device) -> torch.Tensor:
    if kept >= n:
        return torch.arange(n, device=device)[None]
    return torch.cat([torch.arange(sink, device=device), torch.arange(n - (kept - sink), n, device=device)])[None]

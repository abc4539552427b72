"""MoA (Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression" /
"Mixture of Attention Spans", CoLM 2025; official code thu-nics/MoA, notes: shared/methods/decode-kv.md §3).

Rule at inference (MoA's `cache_utils.py`): every head h has an elastic span S_h(N) = α_h + β_h·N; its
cache holds S_h = 64·⌈max(min(α_h + β_h·(N + max_new), N + max_new), 128) / 64⌉ tokens: the first 64 as a
static sink, the rest a ring buffer of the most recent tokens, fixed for the whole generation. The plan
(α_h, β_h) comes from `moa_calibrate` (profiling of attention influence on the model's own answers, then
the choice under a density budget) and is loaded from its JSON; `ratio` picks the plan made for density
1 − ratio. Deviation from the official pipeline, stated: plans are per KV head (influence summed over each
GQA group) instead of converting the model to MHA first. Without a plan every head gets the same span
β = 1 − ratio (a uniform sliding window of the same density, MoA's baseline).
"""
from __future__ import annotations

import dataclasses
import json
import math

import torch

from blockattn.kv import register
from blockattn.kv.base import Policy, Selection, check_int, check_ratio
from blockattn.kv.streaming import _sink_and_recent


def cache_size(alpha: float, beta: float, n: int, *, max_new: int = 1024, sink: int = 64, minimum: int = 128,
               block: int = 64) -> int:
    """Tokens a head with span (α, β) caches for a prompt of `n` tokens (MoA `cache_utils.py:1183-1240`)."""
    total = n + max_new
    span = max(min(int(alpha + beta * total), total), minimum)
    return block * math.ceil(span / block)


@register("moa")
@dataclasses.dataclass
class MoA(Policy):
    plan: str | dict | None = None
    ratio: float | None = None
    sink: int = 64
    min_cache: int = 128
    block: int = 64
    max_new: int = 1024

    def __post_init__(self):
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        check_int("sink", self.sink, 0)
        check_int("min_cache", self.min_cache, 1)
        check_int("block", self.block, 1)
        check_int("max_new", self.max_new, 0)
        if self.min_cache <= self.sink:
            raise ValueError(f"moa: min_cache={self.min_cache} must exceed the sink={self.sink} (the budget holds "
                             "the sink and at least one recent token)")
        if self.plan is None and self.ratio is None:
            raise ValueError("moa needs a plan (from `python -m blockattn.kv.moa_calibrate`) or a ratio")
        if isinstance(self.plan, str):
            with open(self.plan) as f:
                self.plan = json.load(f)
        if self.plan is not None and not isinstance(self.plan, dict):
            raise TypeError(f"moa plan must be a JSON path or a dict, got {type(self.plan).__name__}")

    def spans(self):
        """Per layer and KV head, (α, β)."""
        if self.plan is None:
            return None
        plans = self.plan["spans"]
        if self.ratio is None:
            if len(plans) != 1:
                raise ValueError(f"moa plan holds densities {sorted(plans)}; pick one with ratio=1 − density")
            return next(iter(plans.values()))
        key = f"{1 - self.ratio:.3g}"
        if key not in plans:
            raise ValueError(f"moa plan has no plan for density {key} (ratio={self.ratio}); it has {sorted(plans)}")
        return plans[key]

    def setup(self, model, runtime):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self._spans = self.spans()
        shape = (config.num_hidden_layers, getattr(config, "num_key_value_heads", config.num_attention_heads))
        if self._spans is not None and (len(self._spans), len(self._spans[0])) != shape:
            raise ValueError(f"moa plan is for {len(self._spans)} layers × {len(self._spans[0])} KV heads; the model "
                             f"has {shape[0]} × {shape[1]}")

    def sizes(self, layer: int, heads: int, n: int) -> list[int]:
        if self._spans is None:
            kept = max(int(n * (1 - self.ratio)), self.min_cache)
            return [min(kept, n)] * heads
        return [min(cache_size(a, b, n, max_new=self.max_new, sink=self.sink, minimum=self.min_cache,
                               block=self.block), n) for a, b in self._spans[layer]]

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        sizes = self.sizes(layer, heads, n)
        keep = [_sink_and_recent(n, min(self.sink, size), size, key.device).expand(batch, -1) for size in sizes]
        return Selection(keep, capacity=[size if size < n else None for size in sizes])

    def after_attend(self, cache, state, layer, query, scale):
        for h, cap in enumerate(state.capacity):
            n = state.head_keys[h].shape[1]
            if cap is not None and n > cap:
                state.keep(h, _sink_and_recent(n, min(self.sink, cap), cap, query.device).expand(query.shape[0], -1))


def block_layout(alpha: float, beta: float, blocks: int, block: int = 64) -> torch.Tensor:
    """MoA's scoring layout (`elastic_block_sparse.py:75-98`): w = α//64 + β·n_blocks, a causal band of w
    blocks (the diagonal and w − 1 before it, at least the diagonal) plus block 0: bool `[nb, nb]`."""
    w = int(alpha // block + beta * blocks)
    i = torch.arange(blocks)[:, None]
    j = torch.arange(blocks)[None, :]
    return ((j <= i) & (j > i - max(w, 1))) | ((j == 0) & (j <= i))

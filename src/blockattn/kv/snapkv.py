"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024), as
kvpress's SnapKVPress defines it.

Rule: the last `window_size` queries of the prompt vote: their softmax attention over the earlier keys is
averaged over those queries, smoothed by an average pool of width `kernel_size`, and averaged over each
GQA group; each KV head keeps the top int(n·(1 − ratio)) tokens, the observation window always among them.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from blockattn.kv import register
from blockattn.kv.base import ScorerPolicy, check_int, group_mean, window_probs


@register("snapkv")
@dataclasses.dataclass
class SnapKV(ScorerPolicy):
    window_size: int = 64
    kernel_size: int = 5

    def __post_init__(self):
        super().__post_init__()
        check_int("window_size", self.window_size, 1)
        check_int("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the pool is centred), got {self.kernel_size}")

    def check_budget(self, n, kept):
        if n <= self.window_size:
            raise ValueError(f"snapkv: the prompt ({n} tokens) must be longer than window_size={self.window_size}")
        if kept < self.window_size and self.ratio > 0:
            raise ValueError(f"snapkv: a budget of {kept} tokens (int({n}·(1 − ratio={self.ratio}))) is smaller "
                             f"than the observation window window_size={self.window_size}")

    def score(self, layer, query, key, value, scale):
        w = self.window_size
        probs = window_probs(query, key, w, scale)[..., :-w]          # [B, Hq, w, n - w]
        votes = probs.mean(2)
        votes = F.avg_pool1d(votes, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1,
                             count_include_pad=True)
        votes = group_mean(votes, key.shape[1])
        return torch.cat([votes, votes.new_full((*votes.shape[:2], w), float("inf"))], dim=-1)

"""Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., TACL 2021).

Rule: queries and keys are normalised to unit length and routed to the nearest of `num_clusters`
centroids (largest dot product); a query attends to the keys routed to its own cluster, causally.
Centroids are learnt by online k-means: after each assignment every centroid moves by an
exponential moving average, `mu <- decay * mu + (1 - decay) / 2 * (sum of its queries + sum of its
keys)`, then is renormalised. As a training-free selector the centroids start from the normalised
keys at `num_clusters` evenly spaced positions of the sequence (each head its own) and take
`iterations` online updates on the current q/k before the final assignment; the paper's decay 0.999
moves them little, as in training where the average runs over many steps. Each query also keeps its
own position (our addition, so no row is empty). `num_clusters=None` takes `round(sqrt(L))`, the
paper's choice for its O(n^1.5 d) complexity.

Check done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_routing.py. Not run side by side with the official code (google-research/
routing_transformer, TensorFlow on TPU), whose clusters are additionally balanced (top-w per
centroid); this class uses the paper's nearest-centroid assignment.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._labels import label_layout
from blockattn.methods._select import check_qk, expand_kv_heads
from blockattn.methods.base import Method


@register("routing")
@dataclasses.dataclass
class RoutingTransformer(Method):
    """Args:
        num_clusters: k-means centroids per head; None = round(sqrt(L)).
        decay: the online k-means moving-average decay. Paper: 0.999.
        iterations: online updates on the current q/k before the final assignment.
        causal: no future keys (the paper's language models).
        tile_size: the engine's tile (block_q = block_k).
    """

    num_clusters: int | None = None
    decay: float = 0.999
    iterations: int = 1
    causal: bool = True
    tile_size: int = 64

    def __post_init__(self):
        if self.num_clusters is not None and (isinstance(self.num_clusters, bool) or not isinstance(
                self.num_clusters, int) or self.num_clusters < 1):
            raise ValueError(f"num_clusters must be None or a positive int, got {self.num_clusters!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative int, got {self.iterations!r}")
        self.check_positive_ints("tile_size")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {self.causal!r}")

    def clusters(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(query clusters `[B, Hq, Lq]`, key clusters `[B, Hq, Lk]`, centroids `[B, Hq, C, D]`)."""
        check_qk(q, k)
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        n_clusters = self.num_clusters or max(1, round(math.sqrt(k_len)))
        if n_clusters > k_len:
            raise ValueError(f"num_clusters ({n_clusters}) must not exceed the number of keys ({k_len})")
        queries = torch.nn.functional.normalize(q.float(), dim=-1)
        keys = torch.nn.functional.normalize(expand_kv_heads(k.float(), heads), dim=-1)
        seeds = torch.arange(n_clusters) * k_len // n_clusters
        centroids = keys[:, :, seeds].clone()
        for _ in range(self.iterations):
            q_ids = (queries @ centroids.transpose(-1, -2)).argmax(-1)
            k_ids = (keys @ centroids.transpose(-1, -2)).argmax(-1)
            sums = torch.zeros_like(centroids)
            sums.scatter_add_(2, q_ids.unsqueeze(-1).expand_as(queries), queries)
            sums.scatter_add_(2, k_ids.unsqueeze(-1).expand_as(keys), keys)
            centroids = torch.nn.functional.normalize(self.decay * centroids + (1 - self.decay) / 2 * sums, dim=-1)
        q_ids = (queries @ centroids.transpose(-1, -2)).argmax(-1)
        k_ids = (keys @ centroids.transpose(-1, -2)).argmax(-1)
        return q_ids, k_ids, centroids

    def select(self, q: Tensor, k: Tensor, **ctx) -> BlockLayout:
        if self.causal and q.shape[2] > k.shape[2]:
            raise ValueError(f"q_len ({q.shape[2]}) must not exceed k_len ({k.shape[2]}) for causal routing")
        q_ids, k_ids, centroids = self.clusters(q, k)
        n_clusters = centroids.shape[2]
        same = torch.eye(n_clusters, dtype=torch.bool).expand(q.shape[0], q.shape[1], n_clusters, n_clusters)
        own_position = q.shape[2] <= k.shape[2]
        return label_layout(q_ids, k_ids, same, block_q=self.tile_size, block_k=self.tile_size, causal=self.causal,
                            diagonal=own_position, allow_empty_rows=not own_position)

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

Causal (our rule, so no token's key set depends on later tokens): the centroids stream along the
sequence like the paper's online k-means over training steps. The keys are cut into
`causal_segments` equal segments (at least `num_clusters` keys each); the centroids are seeded from
the first segment's keys and updated on its q/k, then each later segment is routed with the
centroids learnt from the segments before it and updates them in turn. A key keeps the cluster it
was routed to (the first segment's keys: the centroids learnt on it). The first segment's queries
have no past to learn centroids from, so they attend causally to every key (as LongHeads' early
tokens do). Without `causal`, the centroids are seeded and updated on all keys at once.

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
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method


@register("routing")
@dataclasses.dataclass
class RoutingTransformer(Method):
    """Args:
        num_clusters: k-means centroids per head; None = round(sqrt(L)).
        decay: the online k-means moving-average decay. Paper: 0.999.
        iterations: online updates on the current q/k before the final assignment.
        causal: no future keys (the paper's language models); centroids then stream (module docstring).
        tile_size: the engine's tile (block_q = block_k).
        causal_segments: segments the causal centroids are learnt over, one after the other.
    """

    num_clusters: int | None = None
    decay: float = 0.999
    iterations: int = 1
    causal: bool = True
    tile_size: int = 64
    causal_segments: int = 4

    def __post_init__(self):
        _checks.optional_int_arg("num_clusters", self.num_clusters)
        _checks.number_arg("decay", self.decay, low=0.0, high=1.0, high_open=True)
        _checks.int_arg("iterations", self.iterations, minimum=0)
        self.check_positive_ints("tile_size", "causal_segments")
        _checks.bool_arg("causal", self.causal)

    def clusters(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(query clusters `[B, Hq, Lq]`, key clusters `[B, Hq, Lk]`, final centroids `[B, Hq, C, D]`).
        Causal: the first segment's queries get the extra label C (they attend to every earlier key)."""
        check_qk(q, k)
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        n_clusters = self.num_clusters or max(1, round(math.sqrt(k_len)))
        if n_clusters > k_len:
            raise ValueError(f"num_clusters ({n_clusters}) must not exceed the number of keys ({k_len})")
        queries = torch.nn.functional.normalize(q.float(), dim=-1)
        keys = torch.nn.functional.normalize(expand_kv_heads(k.float(), heads), dim=-1)
        if not self.causal:
            seeds = torch.arange(n_clusters, device=q.device) * k_len // n_clusters
            centroids = self._update(keys[:, :, seeds].clone(), queries, keys)
            return self._nearest(queries, centroids), self._nearest(keys, centroids), centroids
        segment = min(k_len, max(-(-k_len // self.causal_segments), n_clusters))
        offset = k_len - q_len  # queries are the last q_len positions
        q_ids = torch.full((batch, heads, q_len), n_clusters, dtype=torch.long, device=q.device)
        k_ids = torch.empty(batch, heads, k_len, dtype=torch.long, device=q.device)
        seeds = torch.arange(n_clusters, device=q.device) * segment // n_clusters
        centroids = keys[:, :, seeds].clone()
        for start in range(0, k_len, segment):
            stop = min(k_len, start + segment)
            rows = slice(max(0, start - offset), max(0, stop - offset))  # the queries at these positions
            if start > 0:  # routed with the centroids learnt before this segment
                q_ids[:, :, rows] = self._nearest(queries[:, :, rows], centroids)
                k_ids[:, :, start:stop] = self._nearest(keys[:, :, start:stop], centroids)
            centroids = self._update(centroids, queries[:, :, rows], keys[:, :, start:stop])
            if start == 0:
                k_ids[:, :, :stop] = self._nearest(keys[:, :, :stop], centroids)
        return q_ids, k_ids, centroids

    @staticmethod
    def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
        return (x @ centroids.transpose(-1, -2)).argmax(-1)

    def _update(self, centroids: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
        """`iterations` online k-means steps on these queries and keys."""
        for _ in range(self.iterations):
            sums = torch.zeros_like(centroids)
            sums.scatter_add_(2, self._nearest(queries, centroids).unsqueeze(-1).expand_as(queries), queries)
            sums.scatter_add_(2, self._nearest(keys, centroids).unsqueeze(-1).expand_as(keys), keys)
            centroids = torch.nn.functional.normalize(self.decay * centroids + (1 - self.decay) / 2 * sums, dim=-1)
        return centroids

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        q_ids, k_ids, centroids = self.clusters(q, k)
        n_clusters = centroids.shape[2]
        same = torch.eye(n_clusters + int(causal), n_clusters, dtype=torch.bool, device=q.device)
        same[n_clusters:] = True  # causal: the first segment's queries see every (earlier) key
        same = same.expand(q.shape[0], q.shape[1], -1, -1)
        own_position = q.shape[2] <= k.shape[2]
        return label_layout(q_ids, k_ids, same, block_q=self.tile_size, block_k=self.tile_size, causal=self.causal,
                            diagonal=own_position, allow_empty_rows=not own_position)

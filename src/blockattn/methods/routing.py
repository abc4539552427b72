"""Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., TACL 2021).

Rule: queries and keys are normalised to unit length and routed by their dot products with
`num_clusters` centroids; a query attends to the keys of its clusters, causally. Two assignments:

- `assignment="balanced"` (default; the official code, lucidrains/routing-transformer
  `distribution()`, and the TF reference's top-w routing): every centroid takes its top-w queries
  and its top-w keys (w = ceil(n / num_clusters) of the n tokens routed at once), so clusters have
  equal sizes and a token can be in several clusters or in none.
- `assignment="nearest"`: each token joins its nearest centroid (argmax), the paper's text.

Centroids: k-means initialised as in the official `Kmeans.init` (there from random samples, here
from the normalised keys at evenly spaced positions, so the selection is deterministic), followed
by `kmeans_iterations` batch k-means steps (official `KMEAN_INIT_ITERS` = 10: assign to the nearest
centroid, each centroid becomes its members' normalised mean, empty ones stay). Then `iterations`
online updates of the paper's exponential moving average, `mu <- decay * mu + (1 - decay) / 2 *
(sum of its queries + sum of its keys)`, renormalised; the paper's decay 0.999 moves them little,
as in training where the average runs over many steps. Each query also keeps its own position (our
addition, so no row is empty; the official code adds a learnt memory key per cluster instead, and a
query in no cluster gets a zero output there). `num_clusters=None` takes `round(sqrt(L))`.

Causal (our rule, so no token's key set depends on later tokens): the centroids stream along the
sequence like the paper's online k-means over training steps. The keys are cut into
`causal_segments` equal segments (at least `num_clusters` keys each, rounded up to whole tiles); the centroids are seeded from
the first segment's keys, k-means initialised and updated on its q/k, then each later segment is
routed (balanced: top-w per centroid among the segment's tokens) with the centroids learnt from the
segments before it and updates them in turn. A key keeps the cluster it
was routed to (the first segment's keys: the centroids learnt on it). The first segment's queries
have no past to learn centroids from, so they attend causally to every key (as LongHeads' early
tokens do). Without `causal`, the centroids are seeded and updated on all keys at once.

Balanced routing decides a segment's memberships together, so (like a block-granular selector)
later tokens of a causal segment can change the clusters of its earlier tokens; keys are never
seen before their position. With `assignment="nearest"` every token's clusters depend on the past only.

Check done: the token mask equals a float64 loop implementation of both rules in
tests/methods/test_routing.py; the balanced memberships equal lucidrains' `distribution()` (top-w
per centroid) re-created there. Not run side by side with the official code.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import expand_kv_heads, pack_bits, row_words_layout
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
        assignment: "balanced" (top-w tokens per centroid, official) or "nearest" (argmax, the paper's text).
        kmeans_iterations: batch k-means steps initialising the centroids. Official: 10.
    """

    within_block_lookahead = True  # balanced routing decides a segment's memberships together
    num_clusters: int | None = None
    decay: float = 0.999
    iterations: int = 1
    causal: bool = True
    tile_size: int = 64
    causal_segments: int = 4
    assignment: str = "balanced"
    kmeans_iterations: int = 10

    def __post_init__(self):
        _checks.optional_int_arg("num_clusters", self.num_clusters)
        _checks.number_arg("decay", self.decay, low=0.0, high=1.0, high_open=True)
        _checks.int_arg("iterations", self.iterations, minimum=0)
        self.check_positive_ints("tile_size", "causal_segments")
        _checks.bool_arg("causal", self.causal)
        _checks.choice_arg("assignment", self.assignment, ("balanced", "nearest"))
        _checks.int_arg("kmeans_iterations", self.kmeans_iterations, minimum=0)

    def memberships(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """bool (queries `[B, Hq, Lq, C+1]`, keys `[B, Hq, Lk, C+1]`): the clusters each token is in. Column C
        (causal): a first-segment query, which attends to every earlier key (every key has column C)."""
        check_qk(q, k)
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        n_clusters = self.num_clusters or max(1, round(math.sqrt(k_len)))
        if n_clusters > k_len:
            raise ValueError(f"num_clusters ({n_clusters}) must not exceed the number of keys ({k_len})")
        queries = torch.nn.functional.normalize(q.float(), dim=-1)
        keys = torch.nn.functional.normalize(expand_kv_heads(k.float(), heads), dim=-1)
        q_in = torch.zeros(batch, heads, q_len, n_clusters + 1, dtype=torch.bool, device=q.device)
        k_in = torch.zeros(batch, heads, k_len, n_clusters + 1, dtype=torch.bool, device=q.device)
        k_in[..., n_clusters] = True
        if not self.causal:
            seeds = torch.arange(n_clusters, device=q.device) * k_len // n_clusters
            centroids = self._init(keys[:, :, seeds].clone(), queries, keys)
            q_in[..., :n_clusters] = self._assign(queries, centroids)
            k_in[..., :n_clusters] = self._assign(keys, centroids)
            return q_in, k_in
        # segments end on tile boundaries (so they line up with every block-granular selector's)
        segment = max(-(-k_len // self.causal_segments), n_clusters)
        segment = min(k_len, -(-segment // self.tile_size) * self.tile_size)
        offset = k_len - q_len  # queries are the last q_len positions
        q_in[..., n_clusters] = True
        seeds = torch.arange(n_clusters, device=q.device) * segment // n_clusters
        centroids = keys[:, :, seeds].clone()
        for start in range(0, k_len, segment):
            stop = min(k_len, start + segment)
            rows = slice(max(0, start - offset), max(0, stop - offset))  # the queries at these positions
            if start > 0:  # routed with the centroids learnt before this segment
                q_in[:, :, rows] = False
                q_in[:, :, rows, :n_clusters] = self._assign(queries[:, :, rows], centroids)
                k_in[:, :, start:stop, :n_clusters] = self._assign(keys[:, :, start:stop], centroids)
                centroids = self._update(centroids, queries[:, :, rows], keys[:, :, start:stop])
            else:
                centroids = self._init(centroids, queries[:, :, rows], keys[:, :, :stop])
                k_in[:, :, :stop, :n_clusters] = self._assign(keys[:, :, :stop], centroids)
        return q_in, k_in

    def clusters(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`assignment="nearest"`, non-causal: (query clusters `[B, Hq, Lq]`, key clusters `[B, Hq, Lk]`,
        centroids `[B, Hq, C, D]`)."""
        check_qk(q, k)
        n_clusters = self.num_clusters or max(1, round(math.sqrt(k.shape[2])))
        queries = torch.nn.functional.normalize(q.float(), dim=-1)
        keys = torch.nn.functional.normalize(expand_kv_heads(k.float(), q.shape[1]), dim=-1)
        seeds = torch.arange(n_clusters, device=q.device) * k.shape[2] // n_clusters
        centroids = self._init(keys[:, :, seeds].clone(), queries, keys)
        return self._nearest(queries, centroids), self._nearest(keys, centroids), centroids

    @staticmethod
    def _nearest(x: Tensor, centroids: Tensor) -> Tensor:
        return (x @ centroids.transpose(-1, -2)).argmax(-1)

    def _assign(self, x: Tensor, centroids: Tensor) -> Tensor:
        """bool `[B, H, n, C]`: balanced (each centroid's top-w tokens) or nearest-centroid membership."""
        n, n_clusters = x.shape[2], centroids.shape[2]
        member = torch.zeros(*x.shape[:3], n_clusters, dtype=torch.bool, device=x.device)
        if n == 0:
            return member
        if self.assignment == "nearest":
            return member.scatter_(-1, self._nearest(x, centroids).unsqueeze(-1), True)
        top = (x @ centroids.transpose(-1, -2)).topk(min(n, -(-n // n_clusters)), dim=2).indices  # [B, H, w, C]
        return member.scatter_(2, top, True)

    def _init(self, centroids: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
        """`kmeans_iterations` batch k-means steps on these queries and keys, then the online updates."""
        points = torch.cat([queries, keys], 2)
        for _ in range(self.kmeans_iterations):
            ids = self._nearest(points, centroids)
            sums = torch.zeros_like(centroids).scatter_add_(2, ids.unsqueeze(-1).expand_as(points), points)
            counts = torch.zeros(centroids.shape[:3], device=points.device).scatter_add_(
                2, ids, torch.ones(ids.shape, device=points.device))
            centroids = torch.where(counts.unsqueeze(-1) > 0, torch.nn.functional.normalize(sums, dim=-1), centroids)
        return self._update(centroids, queries, keys)

    def _update(self, centroids: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
        """`iterations` online k-means steps on these queries and keys."""
        for _ in range(self.iterations):
            sums = torch.zeros_like(centroids)
            sums.scatter_add_(2, self._nearest(queries, centroids).unsqueeze(-1).expand_as(queries), queries)
            sums.scatter_add_(2, self._nearest(keys, centroids).unsqueeze(-1).expand_as(keys), keys)
            centroids = torch.nn.functional.normalize(self.decay * centroids + (1 - self.decay) / 2 * sums, dim=-1)
        return centroids

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        q_in, k_in = self.memberships(q, k)
        batch, heads, q_len, _ = q_in.shape
        k_len, tile = k.shape[2], self.tile_size
        n_k = -(-k_len // tile)
        # each cluster's keys as packed bits per key tile; a query's row is the OR over its clusters
        k_tiles = torch.nn.functional.pad(k_in, (0, 0, 0, n_k * tile - k_len)).view(batch, heads, n_k, tile, -1)
        cluster_words = pack_bits(k_tiles.permute(0, 1, 4, 2, 3))                 # [B, H, C+1, nK, W]
        most = int(q_in.sum(-1).max())
        present, which = q_in.to(torch.uint8).topk(max(most, 1), dim=-1)         # [B, H, Lq, M]
        words = torch.zeros(batch, heads, q_len, n_k, cluster_words.shape[-1], dtype=torch.int64, device=q.device)
        for m in range(most):  # a query is in few clusters: one gather per membership rank
            index = which[..., m].view(batch, heads, q_len, 1, 1).expand(-1, -1, -1, n_k, words.shape[-1])
            picked = cluster_words.gather(2, index)
            words |= torch.where(present[..., m].bool().view(batch, heads, q_len, 1, 1), picked, 0)
        own_position = q_len <= k_len
        if own_position:
            pos = torch.arange(q_len, device=q.device) + (k_len - q_len)
            bit = pos % tile
            one = torch.ones((), dtype=torch.int64, device=q.device)
            rows = torch.arange(q_len, device=q.device)
            words[:, :, rows, pos // tile, bit // 64] |= one << (bit % 64)
        # every row keeps its own position when there is one (no per-row check over the masks then)
        return row_words_layout(words, q_len=q_len, k_len=k_len, block_q=tile, block_k=tile, causal=self.causal,
                                allow_empty_rows=True)

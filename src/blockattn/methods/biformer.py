"""BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., CVPR 2023).

Rule: the tokens are split into regions (an `n_win x n_win` grid of windows over an `(H, W)` image,
or, for a sequence, `n_win` contiguous segments). Region-level queries and keys are the means of
the region's query and key vectors over all heads' channels (the routing is computed once and
shared by the heads); the region affinity `A = Q_r K_r^T` routes each query region to its `topk`
most affine key regions, and every token of the query region attends to every token of the routed
regions. With `causal=True` (our option for LLM use) only regions that do not start after the query
region are candidates, the query region itself is always routed (so no token is left without keys)
and token causality applies on top.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_biformer.py; side by side with the official routing (rayleizhu/BiFormer,
`TopkRouting` in ops/bra_legacy.py, run outside the repository on CPU with window-mean q/k over all
heads' channels), `route` picked the same regions in 20 of 20 random (14, 14)-grid trials
(n_win=7, topk=4, 4 heads). Defaults n_win=7, topk=4 are BiFormer-T's window count and its stage-2 top-k.

Causality (`causal=True`): routing is region-granular. A region's query is the mean over its
tokens, so in prefill the later tokens of a region can change the regions its earlier tokens are
routed to (never letting them see a later key).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._labels import label_layout
from blockattn import _checks
from blockattn._checks import check_qk, int_tuple_arg
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method


def region_labels(length: int, n_win: int, grid=None, device=None) -> Tensor:
    """`[L]` region id of every token, ids `0..R-1` all in use: `n_win x n_win` windows of
    `ceil(H / n_win) x ceil(W / n_win)` tokens over `grid=(H, W)` (row-major tokens), or `n_win`
    contiguous segments of a plain sequence when `grid` is None. Edge regions may be smaller, and
    when n_win does not divide a side some windows hold no token (H = 16, n_win = 7: 6 rows of
    windows); those are left out, as the official zero-padding leaves them padding-only."""
    if grid is None:
        size = -(-length // n_win)
        return torch.arange(length, device=device) // size
    height, width = int_tuple_arg("grid", grid, 2)
    if height * width != length:
        raise ValueError(f"grid {(height, width)} has {height * width} tokens but the sequence has {length}")
    rows = torch.arange(height, device=device) // -(-height // n_win)
    cols = torch.arange(width, device=device) // -(-width // n_win)
    # windows are numbered row-major over the occupied ones only, so no region is empty
    return (rows.view(-1, 1) * (int(cols[-1]) + 1) + cols.view(1, -1)).reshape(-1)


@register("biformer")
@dataclasses.dataclass
class BiFormer(Method):
    """Args:
        n_win: regions per side of the image (or segments of a sequence). Paper: 7.
        topk: routed key regions per query region. Paper (BiFormer-T stage 2): 4.
        causal: LLM use: only past regions, own region always routed, token causality.
        tile_size: the engine's tile (block_q = block_k).
    """

    within_block_lookahead = True  # a region's mean query routes all its tokens
    n_win: int = 7
    topk: int = 4
    causal: bool = False
    tile_size: int = 64

    grid_dims = 2
    any_lengths = False

    def __post_init__(self):
        self.check_positive_ints("n_win", "topk", "tile_size")
        _checks.bool_arg("causal", self.causal)

    def route(self, q: Tensor, k: Tensor, grid=None) -> tuple[Tensor, Tensor]:
        """(region id of every token `[L]`, routed regions bool `[B, nRegions, nRegions]`)."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"biformer is self-attention: q_len ({length}) must equal k_len ({k.shape[2]})")
        labels = region_labels(length, self.n_win, grid, q.device)
        n_regions = int(labels.max()) + 1
        sizes = torch.bincount(labels, minlength=n_regions).view(1, 1, -1, 1).float()
        keys = expand_kv_heads(k.float(), heads)
        q_region = torch.zeros(batch, heads, n_regions, dim, device=q.device).index_add_(2, labels, q.float()) / sizes
        k_region = torch.zeros(batch, heads, n_regions, dim, device=q.device).index_add_(2, labels, keys) / sizes
        # heads share the routing: the affinity of the concatenated channels is the sum over heads
        affinity = torch.einsum("bhrd,bhsd->brs", q_region, k_region)
        regions = torch.arange(n_regions, device=q.device)
        if self.causal:
            first = torch.full((n_regions,), length, device=q.device).scatter_reduce(
                0, labels, torch.arange(length, device=q.device), "amin")
            past = first.view(1, -1) <= first.view(-1, 1)
            affinity = affinity.masked_fill(~past, float("-inf"))
            affinity = torch.where(regions.view(-1, 1) == regions.view(1, -1), float("inf"), affinity)
            candidates = past
        else:
            candidates = torch.ones(n_regions, n_regions, dtype=torch.bool, device=q.device)
        chosen = affinity.topk(min(self.topk, n_regions), dim=-1).indices
        routed = torch.zeros(batch, n_regions, n_regions, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
        return labels, routed & candidates

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        """Layout (heads dimension 1: the heads share the routing) for q `[B, Hq, L, D]`, k `[B, Hkv, L, D]`;
        `grid=(H, W)` for images."""
        labels, routed = self.route(q, k, grid)
        batch, length = q.shape[0], q.shape[2]
        token_labels = labels.view(1, 1, -1).expand(batch, 1, length)
        return label_layout(token_labels, token_labels, routed.unsqueeze(1), block_q=self.tile_size,
                            block_k=self.tile_size, causal=self.causal)

"""VMoBA: Mixture-of-Block Attention for Video Diffusion Models (Wu et al., 2025).

Rule: tokens lie on a (T, H, W) grid in row-major order. Key blocks follow a layer-wise recurrent
partition: layer l uses 1D blocks (`block_1d` whole frames) when l % 3 == 0, 2D blocks (a
`block_2d` spatial patch through all frames) when l % 3 == 1 and 3D blocks (`block_3d` cubes) when
l % 3 == 2; edge blocks may be smaller. Each query token scores every key block by the dot product
with the block's mean-pooled key. Threshold selection as in the official code: scores are min-max
normalised (over the whole head for `selection="head_global"`, the paper's global selection; per
query for `"query_head"`); the block holding the query itself is always kept and its normalised
score counted first; the other (query, block) entries are ranked and kept up to and including the
first one at which the kept share of the normalised total reaches `threshold`. Attention is not
causal (video diffusion). The layout keeps this exact token mask.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_vmoba.py. Side by side with the official code (KwaiVGI/VMoBA src/vmoba.py, run
on CPU outside the repo with `flash_attn` stubbed in `sys.modules` and `MixedAttention` replaced by
a no-op): tokens permuted by its `process_moba_input` (1D chunk = frames, 2D = an (h, w) patch
through all frames, 3D = a (t, h, w) cube), `moba_attn_varlen(select_mode="threshold")` run for
`threshold_type` "head_global" and "query_head", the mask returned by
`_select_threshold_head_global` / `_select_threshold_query_head` plus the self chunk mapped back to
the (T, H, W) token order; random fp32 inputs, batch 1, 2 heads, dim 16, grids (4, 8, 8),
(6, 4, 8), (8, 8, 4), (2, 16, 16) with four block-shape sets, layers 0/1/2 (1D/2D/3D), thresholds
0.1/0.25/0.5/0.9, 2 seeds: the token masks were identical in all 192 cases (densities 0.08 to
0.88). Not covered: grids that the block shape does not divide (the official code asserts
divisibility; edge blocks here are smaller), and packed multi-sequence batches, where the official
"head_global" normalises and ranks over all packed sequences together (here each batch element
on its own). The block sizes are our defaults; the layer schedule (1D, 2D, 3D in turn) is from
the paper and is not in the official module.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk, int_arg, int_tuple_arg
from blockattn.methods._labels import label_layout
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import Method

_EPS = 1e-6  # as in the official selection


@register("vmoba")
@dataclasses.dataclass
class VMoBA(Method):
    """Args:
        threshold: share of the normalised similarity kept, in (0, 1] (official default 0.25).
        block_1d: frames per 1D block.
        block_2d: (h, w) of a 2D block (spanning all frames).
        block_3d: (t, h, w) of a 3D block.
        selection: "head_global" (rank all (query, block) entries of a head together) or
            "query_head" (rank each query's blocks on their own).
        tile_size: the engine's tile (block_q = block_k).
    """

    threshold: float = 0.25
    block_1d: int = 1
    block_2d: tuple = (8, 8)
    block_3d: tuple = (2, 4, 4)
    selection: str = "head_global"
    tile_size: int = 64

    causal_modes = (False,)
    grid_dims = 3
    needs_grid = True
    any_lengths = False

    def __post_init__(self):
        _checks.fraction_arg("threshold", self.threshold)
        _checks.int_arg("block_1d", self.block_1d)
        self.block_2d = int_tuple_arg("block_2d", self.block_2d, 2)
        self.block_3d = int_tuple_arg("block_3d", self.block_3d, 3)
        _checks.choice_arg("selection", self.selection, ("head_global", "query_head"))
        self.check_positive_ints("tile_size")

    def block_ids(self, grid, layer: int, device=None) -> Tensor:
        """`[L]` key-block id of every token for `layer`'s partition (1D, 2D, 3D in turn)."""
        t, h, w = grid
        shape = ((self.block_1d, h, w), (t,) + self.block_2d, self.block_3d)[layer % 3]
        coords = torch.stack(torch.meshgrid(*(torch.arange(n, device=device) for n in (t, h, w)), indexing="ij"), -1)
        counts = [-(-n // s) for n, s in zip(grid, shape)]
        cell = coords.view(-1, 3) // torch.tensor(shape, device=device)
        return (cell[:, 0] * counts[1] + cell[:, 1]) * counts[2] + cell[:, 2]

    def gates(self, q: Tensor, k: Tensor, *, grid, layer: int = 0) -> Tensor:
        """bool `[B, Hq, L, nBlocks]`: the key blocks each query token attends to."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"vmoba is self-attention: q_len ({length}) must equal k_len ({k.shape[2]})")
        if grid is None:
            raise ValueError("vmoba needs grid=(T, H, W), the video's token grid")
        grid = int_tuple_arg("grid", grid, 3)
        if grid[0] * grid[1] * grid[2] != length:
            raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1] * grid[2]} tokens but the sequence has {length}")
        layer = int_arg("layer", layer, minimum=0)
        ids = self.block_ids(grid, layer, q.device)
        n_blocks = self._n_blocks(grid, layer)
        keys = expand_kv_heads(k.float(), heads)
        sums = torch.zeros(batch, heads, n_blocks, dim, device=q.device).index_add_(2, ids, keys)
        pooled = sums / torch.bincount(ids, minlength=n_blocks).view(1, 1, -1, 1)
        gate = q.float() @ pooled.transpose(-1, -2)  # [B, H, L, nBlocks]
        own = torch.zeros(length, n_blocks, dtype=torch.bool, device=q.device)
        own[torch.arange(length, device=q.device), ids] = True
        # entries ranked together: all of a head's (query, block) pairs, or each query's blocks
        dims = (2, 3) if self.selection == "head_global" else (3,)
        low, high = gate.amin(dim=dims, keepdim=True), gate.amax(dim=dims, keepdim=True)
        span = torch.where(high - low <= _EPS, torch.ones_like(high), high - low)
        norm = (gate - low) / span
        total = norm.sum(dim=dims, keepdim=True)
        remain = (self.threshold - (norm * own).sum(dim=dims, keepdim=True) / (total + _EPS)).clamp(min=0)
        others = norm.masked_fill(own, 0.0)
        if self.selection == "head_global":
            others, total, remain = others.reshape(batch, heads, -1), total.view(batch, heads, 1), remain.view(batch, heads, 1)
        ranked, order = others.sort(dim=-1, descending=True, stable=True)
        # keep the ranked entries up to and including the first at which the share is reached
        reached = ranked.cumsum(-1) / (total + _EPS) >= remain
        cutoff = torch.where(reached.any(-1), reached.float().argmax(-1), reached.shape[-1] - 1)
        keep = torch.arange(ranked.shape[-1], device=q.device) <= cutoff.unsqueeze(-1)
        chosen = torch.zeros_like(keep).scatter(-1, order, keep).view_as(gate)
        return chosen | own

    def _n_blocks(self, grid, layer: int) -> int:
        t, h, w = grid
        shape = ((self.block_1d, h, w), (t,) + self.block_2d, self.block_3d)[layer % 3]
        return math.prod(-(-n // s) for n, s in zip(grid, shape))

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        layer = 0 if layer is None else layer
        gates = self.gates(q, k, grid=grid, layer=layer)
        batch, heads, length, _ = gates.shape
        # query token i may see key token j when its gate chose j's block: labels are the query's own
        # index and the key's block id
        token_ids = torch.arange(length, device=q.device).expand(batch, heads, length)
        block_of_key = self.block_ids(grid, layer, q.device).expand(batch, heads, length)
        return label_layout(token_ids, block_of_key, gates, block_q=self.tile_size, block_k=self.tile_size,
                            causal=False)

"""MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025).

Rule: keys are split into blocks of `block_size` tokens. Each query token scores every key block
that lies entirely in its past by the dot product with the block's mean-pooled key, and attends to
the `top_k` best blocks; the block holding the query itself is always one of them (attended
causally) and future blocks never are. Gating is per query token, so the layout keeps MoBA's exact
token mask: key tiles of `tile_size` tokens, each listed for the query blocks in which some token
chose it, with a row mask for the tokens that did. A `BlockScorer` with per-token rows: top-k over the
allowed (past and current) blocks, the current one forced.

`sink=True` (off by default, not in the paper) also keeps the first block for every query, outside the
`top_k` count: MoBA is trained with its gate, and a model trained with dense attention puts about a third
of its attention on the first tokens (the attention sink; SmolLM2-135M's answer queries in
docs/bench/retrieval_prose.md), which the gate rarely picks.

Checks done: the token mask equals a float64 per-token loop implementation of this rule in
tests/methods/test_moba.py. Side by side with the official reference `moba_attn_varlen_naive`
(MoonshotAI/MoBA, moba/moba_naive.py, pure torch, run on CPU outside the repo): attention through
this layout matched its output to 8e-7 (float32 rounding; a different gate moves outputs by ~1e-2)
on random inputs with (L, block, top-k) = (1024, 128, 3), (2000, 256, 2), (1536, 512, 3), (700, 64, 4).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.methods import register
from blockattn.methods._select import expand_kv_heads
from blockattn.methods.base import BlockScorer, BlockScores


@register("moba")
@dataclasses.dataclass
class MoBA(BlockScorer):
    """Args:
        block_size: MoBA key-block size in tokens (paper: 512 in its 8K-context experiments).
        top_k: blocks each query attends to, the current block included (paper: 3).
        tile_size: the engine's tile (block_q = block_k); must divide block_size.
        sink: also keep the first block (the attention sink of a model trained dense) for every query, on
            top of the `top_k` gated ones (not MoBA's rule; default False).
    """

    block_size: int = 512
    top_k: int = 3
    tile_size: int = 64
    sink: bool = False

    causal_modes = (True,)
    keep_rule = "top_k"

    def __post_init__(self):
        self.check_positive_ints("block_size", "top_k", "tile_size")
        if not isinstance(self.sink, bool):
            raise TypeError(f"sink must be a bool, got {type(self.sink).__name__}")
        if self.block_size % self.tile_size:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of tile_size ({self.tile_size})")

    def gates(self, q: Tensor, k: Tensor) -> Tensor:
        """bool `[B, Hq, Lq, nBlocks]`: which MoBA blocks each query token attends to."""
        blocks = self._score_blocks(q, k, causal=True)
        return self.keep_blocks(blocks, self.top_k)

    def _score_blocks(self, q: Tensor, k: Tensor, *, causal: bool) -> BlockScores:
        # per query token (block_q = 1) against MoBA blocks: the current block forced, past ones allowed
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        n_blocks = -(-k_len // self.block_size)
        padded = torch.nn.functional.pad(k.float(), (0, 0, 0, n_blocks * self.block_size - k_len))
        sizes = (k_len - torch.arange(n_blocks, device=q.device) * self.block_size).clamp(max=self.block_size)
        # pooled per key head, then shared by its query heads
        pooled = padded.view(batch, k.shape[1], n_blocks, self.block_size, -1).sum(3) / sizes.view(1, 1, -1, 1)
        pooled = expand_kv_heads(pooled, heads)
        scores = q.float() @ pooled.transpose(-1, -2)  # [B, Hq, Lq, nBlocks]
        position = torch.arange(q_len, device=q.device) + (k_len - q_len)  # queries are the last q_len tokens
        current = position // self.block_size
        block_ids = torch.arange(n_blocks, device=q.device)
        past = block_ids.view(1, -1) < current.view(-1, 1)
        is_current = block_ids.view(1, -1) == current.view(-1, 1)
        # every token keeps its own (current) block, so no row of the layout is empty
        always = None
        if self.sink:  # the first block, for every query (it is in every query's past or is its own block)
            always = block_ids.view(1, -1) == 0
        return BlockScores(scores, 1, self.block_size, allowed=past | is_current, forced=is_current, always=always)

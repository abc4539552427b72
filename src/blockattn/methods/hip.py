"""HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning (Lee et al., ICLR 2025).

Rule: per query block and head, a tree search finds `k / block_size_k` key blocks among the
blocks before the block's sliding window. The candidate range is first cut into that many equal
nodes; then, level by level, every node is split in two (a one-block node stays whole), each child
is scored by its representative key — the child's centre token — as the largest `q . k_rep` over
the block's queries, and the best `k / block_size_k` children become the next level's nodes. When
every node is one block, the nodes are the selection. As in the official code (DeepAuto-AI/
hip-attention v1.1, `attention2_draft_causal_batch_gpu.py`: the search range ends at `TSRC -
sliding_window_size`, window 128, sink 4 tokens), the last `window` keys before the block's causal
end are attended densely and left out of the search, so no search slot lands on the diagonal, and
the first `sink_tokens` keys are always attended (as a column mask of the first tile unless the
search picked that tile). Rows whose search range holds no more blocks than the budget keep them
all. The search costs O(k log L) scores per query block instead of O(L).

Deliberate differences from the official code: the paper's fine key granularity (b_k = 2 tokens,
query blocks of 64 with stride 2) is replaced by the engine tile, and the window is rounded out to
whole tiles (the tiles holding any of the block's window keys are attended whole). Check done: the
selection equals a float64 loop implementation of this search in tests/methods/test_hip.py, which
also checks that every level keeps the top-k of its own hierarchical scores and that no search
slot lands on a window tile.

Not a `BlockScorer`: there is no one score per (query block, key block) to keep by threshold or
top-k; each level scores the children of the nodes the previous level kept (representative keys of
ranges that change level by level), and only the last level's top-k is the selection.

Causality: the selection is block-granular. The search scores a key block by the best of the query
block's queries, so in prefill the later tokens of a query block can change the key blocks its
earlier tokens attend to (never letting them see a later key), as in the official code.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import pack_bits, stripe_layout
from blockattn.methods.base import Method


@register("hip")
@dataclasses.dataclass
class HiPAttention(Method):
    """Args:
        k: key tokens each query block selects by the tree search. Paper: 512.
        block_size_q: query block (and tile) size. Paper: 32; here the engine tile.
        block_size_k: key block (and tile) size. Paper: 2; here the engine tile.
        sink_tokens: first keys always attended (attention sink). Official: 4.
        window: keys before each block's causal end attended densely and kept out of the search
            (causal only). Official: 128.
        causal: no future keys (LLM prefill).
    """

    within_block_lookahead = True  # a key block is scored by the best query of the block
    k: int = 512
    block_size_q: int = 64
    block_size_k: int = 64
    sink_tokens: int = 4
    window: int = 128
    causal: bool = True

    def __post_init__(self):
        self.check_positive_ints("k", "block_size_q", "block_size_k")
        if self.k % self.block_size_k:
            raise ValueError(f"k ({self.k}) must be a multiple of block_size_k ({self.block_size_k})")
        _checks.int_arg("sink_tokens", self.sink_tokens, minimum=0)
        _checks.int_arg("window", self.window, minimum=0)
        _checks.bool_arg("causal", self.causal)

    def visible_blocks(self, q_len: int, k_len: int, device=None) -> Tensor:
        """`[nQ]`: how many leading key blocks each query block may see."""
        n_q, n_k = -(-q_len // self.block_size_q), -(-k_len // self.block_size_k)
        if not self.causal:
            return torch.full((n_q,), n_k, device=device)
        last = (torch.arange(1, n_q + 1, device=device) * self.block_size_q).clamp(max=q_len) - 1 + (k_len - q_len)
        return last // self.block_size_k + 1

    def search_blocks(self, q_len: int, k_len: int, device=None) -> Tensor:
        """`[nQ]`: how many leading key blocks the search may choose from (those wholly before the
        block's window; causal), the rest up to `visible_blocks` being the window."""
        n_q, n_k = -(-q_len // self.block_size_q), -(-k_len // self.block_size_k)
        if not self.causal:
            return torch.full((n_q,), n_k, device=device)
        end = (torch.arange(1, n_q + 1, device=device) * self.block_size_q).clamp(max=q_len) + (k_len - q_len)
        return (end - self.window).clamp(min=0) // self.block_size_k

    def search(self, q: Tensor, k: Tensor) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """The tree search level by level: for each level (candidate starts, candidate ends, candidate
        scores, chosen) with candidates `[B, Hq, nQ, C]` as key-block ranges `[start, end)` (empty
        candidates have start == end and score -inf) and chosen bool `[B, Hq, nQ, C]`."""
        batch, heads, q_len, dim = q.shape
        k_len = k.shape[2]
        budget = self.k // self.block_size_k
        bq, bk = self.block_size_q, self.block_size_k
        n_q = -(-q_len // bq)
        heads_kv = k.shape[1]
        keys = k.float()
        # padding rows repeat the last query, so a block's best score needs no row mask
        queries = q.float()
        if n_q * bq != q_len:
            queries = torch.cat([queries, queries[:, :, -1:].expand(-1, -1, n_q * bq - q_len, -1)], 2)
        queries = queries.view(batch, heads, n_q, bq, dim)
        visible = self.search_blocks(q_len, k_len, q.device).view(1, 1, n_q, 1)
        slot = torch.arange(budget, device=q.device).view(1, 1, 1, -1)
        starts = (slot * visible) // budget
        ends = ((slot + 1) * visible) // budget
        starts, ends = starts.expand(batch, heads, n_q, budget), ends.expand(batch, heads, n_q, budget)
        levels = []
        while True:
            middle = (starts + ends + 1) // 2
            cand_starts = torch.cat([starts, middle], -1)
            cand_ends = torch.cat([middle, ends], -1)
            nonempty = cand_ends > cand_starts
            first = cand_starts * bk
            last = (cand_ends * bk).clamp(max=k_len) - 1
            representative = ((first + last) // 2).clamp(min=0, max=k_len - 1)
            # representatives of a key head's query heads gathered in one go (no per-query-head key copy)
            rep_keys = keys.gather(2, representative.reshape(batch, heads_kv, -1, 1).expand(-1, -1, -1, dim))
            rep_keys = rep_keys.view(batch, heads, n_q, -1, dim)
            # candidates x queries: the best over the block's queries is a contiguous reduction
            scores = (rep_keys @ queries.transpose(-1, -2)).amax(-1)
            scores = scores.masked_fill(~nonempty, float("-inf"))
            chosen_ids = scores.topk(budget, dim=-1).indices
            chosen = torch.zeros_like(nonempty).scatter_(-1, chosen_ids, True) & nonempty
            levels.append((cand_starts, cand_ends, scores, chosen))
            starts, ends = cand_starts.gather(-1, chosen_ids), cand_ends.gather(-1, chosen_ids)
            if not bool(((ends - starts) > 1).any()):
                return levels

    def block_mask(self, q: Tensor, k: Tensor) -> Tensor:
        """bool `[B, Hq, nQ, nK]`: the key blocks attended whole (search picks, window, short rows);
        the sink tokens come on top (`select`)."""
        check_qk(q, k)
        batch, heads, q_len, _ = q.shape
        k_len = k.shape[2]
        if self.causal and q_len > k_len:
            raise ValueError(f"q_len ({q_len}) must not exceed k_len ({k_len}) for causal HiP")
        n_q, n_k = -(-q_len // self.block_size_q), -(-k_len // self.block_size_k)
        visible = self.visible_blocks(q_len, k_len, q.device)
        searched = self.search_blocks(q_len, k_len, q.device)
        block_ids = torch.arange(n_k, device=q.device).view(1, -1)
        seen = block_ids < visible.view(-1, 1)                                          # [nQ, nK]
        # the window (and with window=0 still the block's own key block) is attended whole
        window = seen & (block_ids >= torch.minimum(searched, visible - 1).view(-1, 1)) & self.causal
        budget = self.k // self.block_size_k
        starts, ends, _, chosen = self.search(q, k)[-1]
        mask = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.bool, device=q.device)
        picked = torch.where(chosen & (ends - starts == 1), starts, n_k)
        mask.scatter_(-1, picked.long(), True)
        mask = mask[..., :n_k]
        mask |= (searched <= budget).view(1, 1, -1, 1) & (block_ids < searched.view(-1, 1))  # short ranges: all
        return (mask & seen) | window

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        blocks = self.block_mask(q, k)
        bq, bk = self.block_size_q, self.block_size_k
        q_len, k_len = q.shape[2], k.shape[2]
        n_k = blocks.shape[-1]
        # whole tiles as all-ones column words, the sink's tiles (unless whole) as their first columns
        whole = pack_bits(torch.ones(bk, dtype=torch.bool, device=q.device))
        columns = (torch.arange(n_k, device=q.device).view(-1, 1) * bk + torch.arange(bk, device=q.device)) \
            < self.sink_tokens
        words = torch.where(blocks.unsqueeze(-1), whole, pack_bits(columns).view(1, 1, 1, n_k, -1))
        return stripe_layout(words, axis="columns", q_len=q_len, k_len=k_len, block_q=bq, block_k=bk,
                             causal=self.causal)

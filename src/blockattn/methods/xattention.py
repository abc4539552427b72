"""XAttention: Block Sparse Attention with Antidiagonal Scoring (Xu et al., 2025).

Rule: a block's importance is estimated by summing its attention along antidiagonals sampled
every `stride` tokens. Concretely, queries are regrouped as `q[r*S + S-1-i]` and keys as
`k[c*S + i]` (i < S) and concatenated along the feature axis, so one dot product of the regrouped
rows is the sum of the S x S cell's antidiagonal of Q K^T. Those strided scores (scaled by
1/(sqrt(D)*S), causal at cell granularity) are softmax-normalised per row and summed per
(block_size/S)^2 cell group into block scores; each query block then keeps the fewest key blocks
whose scores reach `threshold` of the row's total. The diagonal block (its own tokens) and the
first block are always kept, as in the official implementation.

Check done: the selection equals a float64 loop implementation of this rule in
tests/methods/test_xattention.py (no side-by-side run of the official code, which is CUDA/Triton).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._select import check_qk, cumulative_threshold, expand_kv_heads
from blockattn.methods.base import Method

_ROWS_PER_CHUNK = 128  # strided query rows scored at once (a multiple of block_size/stride): small bands
# bound memory and let causal bands skip the columns after them


@register("xattention")
@dataclasses.dataclass
class XAttention(Method):
    """Args:
        threshold: cumulative block-score mass to keep per query block, in (0, 1]. Paper default 0.9.
        stride: antidiagonal sampling stride S. Paper default 8.
        block_size: block size of the layout (queries and keys). Paper default 128.
        causal: causal attention (LLM prefill).
    """

    threshold: float = 0.9
    stride: int = 8
    block_size: int = 128
    causal: bool = True

    def __post_init__(self):
        if not (0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ValueError(f"stride must be a positive int, got {self.stride!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size % self.stride:
            raise ValueError(f"block_size must be a positive multiple of stride={self.stride}, got {self.block_size!r}")

    def block_scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Antidiagonal block scores `[B, Hq, nQ, nK]` (each causal row sums to ~block_size/stride)."""
        check_qk(q, k)
        batch, heads, q_len, dim = q.shape
        k_len = k.shape[2]
        S, block = self.stride, self.block_size
        k = expand_kv_heads(k, heads)
        n_q, n_k = -(-q_len // block), -(-k_len // block)
        q = torch.nn.functional.pad(q.float(), (0, 0, 0, n_q * block - q_len))
        k = torch.nn.functional.pad(k.float(), (0, 0, 0, n_k * block - k_len))
        rows, cols = n_q * block // S, n_k * block // S
        q_strided = torch.cat([q[:, :, S - 1 - i::S] for i in range(S)], dim=-1)  # [B, H, rows, D*S]
        k_strided = torch.cat([k[:, :, i::S] for i in range(S)], dim=-1)          # [B, H, cols, D*S]
        per_block = block // S
        scores = torch.zeros(batch, heads, n_q, n_k, device=q.device)
        offset = k_len - q_len  # bottom-right alignment of queries against keys
        band = per_block * max(1, _ROWS_PER_CHUNK // per_block)
        for start in range(0, rows, band):
            stop = min(rows, start + band)
            width = cols
            if self.causal:
                # causal rows never see cells past the chunk's last query: skip those columns
                last_visible = (stop * S - 1 + offset) // S
                width = min(cols, -(-(last_visible + 1) // per_block) * per_block)
            col_pos = torch.arange(width, device=q.device)
            logits = q_strided[:, :, start:stop] @ k_strided[:, :, :width].transpose(-1, -2) / (dim ** 0.5 * S)
            row_pos = torch.arange(start, stop, device=q.device)
            allowed = col_pos.view(1, -1) * S < k_len
            if self.causal:
                # cell (r, c) is visible when its first key is not after the query cell's last query
                allowed = allowed & (col_pos.view(1, -1) * S <= (row_pos.view(-1, 1) + 1) * S - 1 + offset)
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
            probs = probs * (row_pos * S < q_len).view(-1, 1)  # cells made only of padding carry no mass
            probs = probs.view(batch, heads, (stop - start) // per_block, per_block, width // per_block, per_block)
            scores[:, :, start // per_block:stop // per_block, :width // per_block] = probs.sum(dim=(3, 5))
        return scores

    def select(self, q: Tensor, k: Tensor, **ctx) -> BlockLayout:
        scores = self.block_scores(q, k)
        n_q, n_k = scores.shape[-2:]
        q_len, k_len = q.shape[2], k.shape[2]
        forced = torch.zeros(n_q, n_k, dtype=torch.bool, device=q.device)
        forced[:, 0] = True
        if self.causal:
            # the block holding each query block's last query (in the key frame): its own tokens
            last_query = ((torch.arange(n_q, device=q.device) + 1) * self.block_size).clamp(max=q_len) - 1
            forced[torch.arange(n_q), ((last_query + k_len - q_len) // self.block_size).clamp(0, n_k - 1)] = True
        blocks = cumulative_threshold(scores, self.threshold, forced=forced.expand_as(scores))
        return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=self.block_size,
                                      block_k=self.block_size, causal=self.causal)


"""Strided context shards per head (S2-Attention).

Lin et al., "Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention
Heads" (S2-Attention, DKernel). Rule: key blocks are dealt out round-robin with period
`vertical_stride`; head h reads the shard of key blocks `kb % vertical_stride == h % vertical_stride`
plus a dense local window of the `local_blocks` key blocks ending at the query's own block, all under
the causal constraint. With at least `vertical_stride` heads the shards' union is the full causal
context, which is the paper's point: no head sees everything, the heads together do.
"""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout, _analytic_block_support, _cdiv, _check_positive_int
from blockattn.patterns._grid import tile_layout
from blockattn.patterns.basic import _lengths

__all__ = ["s2_attention"]


def s2_attention(q_len: int, k_len: int | None = None, *, heads: int, vertical_stride: int = 8,
                 local_blocks: int = 16, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Per-head strided shards plus local blocks, causal (bottom-right aligned when `q_len < k_len`).

    The shard granularity is `block_k`. `vertical_stride` must not exceed `heads`, so that every
    shard is read by some head. (Defaults are illustrative, not the paper's tuned settings.)
    """
    q_len, k_len = _lengths(q_len, k_len)
    heads = _check_positive_int("heads", heads)
    vertical_stride = _check_positive_int("vertical_stride", vertical_stride)
    local_blocks = _check_positive_int("local_blocks", local_blocks)
    if vertical_stride > heads:
        raise ValueError(f"vertical_stride ({vertical_stride}) must not exceed heads ({heads}), or some shard "
                         f"is read by no head and the union of shards is not the full context")
    offset = k_len - q_len
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    head_shard = torch.arange(heads) % vertical_stride
    strided = (torch.arange(n_k).view(1, 1, -1) % vertical_stride) == head_shard.view(-1, 1, 1)
    # local: key blocks within local_blocks of the block holding some query of the query block
    q_first = torch.arange(n_q) * block_q + offset
    q_last = (torch.arange(n_q) * block_q + block_q - 1).clamp(max=q_len - 1) + offset
    kb = torch.arange(n_k).view(1, -1)
    local = (kb >= (q_first // block_k).view(-1, 1) - local_blocks + 1) & (kb <= (q_last // block_k).view(-1, 1))
    causal = _analytic_block_support(q_len, k_len, block_q, block_k, True, None, torch.device("cpu"))
    candidates = (strided | local[None]) & causal[None]
    if block_q == block_k and offset % block_k == 0:
        # every query of a block shares its key block, so the rule is block-level: only the causal
        # diagonal needs a token constraint, which the analytic causal flag provides
        return BlockLayout.from_dense(candidates[None], q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                      causal=True)

    def allowed(h, q_idx, k_idx):
        pos = q_idx + offset
        k_block = k_idx // block_k
        near = (pos // block_k) - k_block < local_blocks
        return (k_idx <= pos) & (near | (k_block % vertical_stride == head_shard[h]))

    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed)

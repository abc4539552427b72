"""Strided context shards per head (S2-Attention).

Lin et al., "Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention
Heads" (S2-Attention, DKernel `get_sparse_attn_mask`). Rule: key blocks are dealt out round-robin
with period `vertical_stride`; KV head g reads the key blocks with
`(kb + g * step + head_offset) % vertical_stride == 0`, `step = max(1, vertical_stride // heads)`,
plus a dense local window of the `local_blocks` key blocks ending at the query's own block, all under
the causal constraint. Query heads of one KV group share their KV head's shard (so the KV cache a
group needs shrinks too), and the last `dense_heads` KV heads read every block. `head_offset=0` is
DKernel's rule; `head_offset=1` is the Phi-3-small port of the same kernel, which ships trained
checkpoints. With at least `vertical_stride` sparse heads the shards' union is the full causal
context, which is the paper's point: no head sees everything, the heads together do; with fewer
heads, `step` spreads them out and some shards are read by no head (as in DKernel). DKernel's
`homo_head` (one pattern for all heads) is `kv_heads=1`.

`causal=False` is DKernel's bidirectional mode (`vert_position_type="relative"`): every head reads
the key blocks whose distance beyond the local band, `max(0, qb − kb − local + 1) +
max(0, kb − qb − local + 1)`, is a multiple of `vertical_stride` (the same for every sparse head),
with `local_blocks` blocks on each side counting the query's own.
"""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout, _analytic_block_support, _cdiv, _check_positive_int
from blockattn.patterns._grid import tile_layout
from blockattn.patterns.basic import _lengths

__all__ = ["s2_attention"]


def s2_attention(q_len: int, k_len: int | None = None, *, heads: int, vertical_stride: int = 8,
                 local_blocks: int = 16, kv_heads: int | None = None, dense_heads: int = 0, head_offset: int = 0,
                 causal: bool = True, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Per-head strided shards plus local blocks, causal (bottom-right aligned when `q_len < k_len`).

    Args:
        heads: query heads (the layout has one mask per query head).
        vertical_stride, local_blocks: DKernel's `vert_stride` and `local_blocks` (the local count
            includes the query's own block). Defaults (block 64, local 16, stride 8) are the
            Phi-3-small block-sparse settings.
        kv_heads: KV heads (GQA; default `heads`); query head h uses KV head `h // (heads // kv_heads)`.
        dense_heads: the last `dense_heads` KV heads attend to the full causal context.
        head_offset: 0 (DKernel) or 1 (Phi-3-small); any int is accepted.
        causal: False for the bidirectional mode (see the module docstring; needs `q_len == k_len`).
    The shard granularity is `block_k`.
    """
    q_len, k_len = _lengths(q_len, k_len)
    heads = _check_positive_int("heads", heads)
    vertical_stride = _check_positive_int("vertical_stride", vertical_stride)
    local_blocks = _check_positive_int("local_blocks", local_blocks)
    kv_heads = heads if kv_heads is None else _check_positive_int("kv_heads", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"kv_heads must divide heads={heads}, got {kv_heads}")
    if isinstance(dense_heads, bool) or not isinstance(dense_heads, int) or not 0 <= dense_heads <= kv_heads:
        raise ValueError(f"dense_heads must be an int in [0, kv_heads={kv_heads}], got {dense_heads!r}")
    if isinstance(head_offset, bool) or not isinstance(head_offset, int):
        raise ValueError(f"head_offset must be an int (0: DKernel, 1: Phi-3-small), got {head_offset!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not causal:
        return _bidirectional(q_len, k_len, heads, vertical_stride, local_blocks, kv_heads, dense_heads,
                              block_q, block_k)
    offset = k_len - q_len
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    # DKernel's step counts query heads, its shard index runs over KV heads
    step = max(1, vertical_stride // heads)
    group = torch.arange(heads) // (heads // kv_heads)
    head_shift = group * step + head_offset
    dense = group >= kv_heads - dense_heads
    strided = ((torch.arange(n_k).view(1, 1, -1) + head_shift.view(-1, 1, 1)) % vertical_stride == 0) \
        | dense.view(-1, 1, 1)
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
        return (k_idx <= pos) & (near | ((k_block + head_shift[h]) % vertical_stride == 0) | dense[h])

    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed)


def _bidirectional(q_len, k_len, heads, vertical_stride, local_blocks, kv_heads, dense_heads, block_q, block_k):
    if q_len != k_len:
        raise ValueError(f"causal=False needs q_len == k_len, got {q_len} and {k_len}")
    dense = (torch.arange(heads) // (heads // kv_heads)) >= kv_heads - dense_heads

    def allowed(h, q_idx, k_idx):
        qb, kb = q_idx // block_k, k_idx // block_k  # the query's block in key-block units
        beyond = (qb - kb - local_blocks + 1).clamp(min=0) + (kb - qb - local_blocks + 1).clamp(min=0)
        return (beyond % vertical_stride == 0) | dense[h]

    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    if block_q == block_k:  # a block-level rule: no token masks needed
        qb, kb = torch.arange(n_q).view(1, -1, 1), torch.arange(n_k).view(1, 1, -1)
        return BlockLayout.from_dense(allowed(torch.arange(heads).view(-1, 1, 1), qb * block_k, kb * block_k)[None],
                                      q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k)
    candidates = torch.ones(heads, n_q, n_k, dtype=torch.bool)
    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed)

"""Attention sinks plus a local window: StreamingLLM's token rule and MInference's block-level A-shape.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024): each query keeps
the first `sink` tokens (which absorb attention mass whatever their content) and the `window` most
recent tokens, causally. Jiang et al., "MInference 1.0" (NeurIPS 2024) calls the same shape, taken at
block granularity, the A-shape head pattern.
"""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout, _block_lists, _cdiv, _check_positive_int
from blockattn.patterns.basic import _lengths


def _check(sink, window):
    sink = _check_positive_int("sink", sink)
    window = _check_positive_int("window", window)
    return sink, window


def streaming(q_len: int, k_len: int | None = None, *, sink: int, window: int, block_q: int = 64,
              block_k: int = 64) -> BlockLayout:
    """Token-exact StreamingLLM mask: query i (bottom-right aligned) keeps key j when j <= i and
    (j < sink or i - window < j)."""
    q_len, k_len = _lengths(q_len, k_len)
    sink, window = _check(sink, window)
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    # candidate tiles: the sink columns and the window band; causality is left to the analytic rule
    candidates = a_shape(q_len, k_len, sink=sink, window=window, block_q=block_q, block_k=block_k)
    tb, th, tq, tk = candidates.listed_tiles()
    causal_ok = candidates.tile_token_masks(tb, th, tq, tk)
    rows = tq.view(-1, 1, 1) * block_q + torch.arange(block_q).view(1, -1, 1) + (k_len - q_len)
    cols = tk.view(-1, 1, 1) * block_k + torch.arange(block_k).view(1, 1, -1)
    rule = (cols < sink) | (cols > rows - window)
    keep = (rule & causal_ok).flatten(1).any(1)
    needs_mask = keep & ~(rule | ~causal_ok).flatten(1).all(1)
    dense = torch.zeros(1, 1, n_q, n_k, dtype=torch.bool)
    dense[0, 0, tq[keep], tk[keep]] = True
    counts, indices = _block_lists(dense)
    tile_mask_ids = tile_masks = None
    if needs_mask.any():
        # only the sink/window rule is stored; the kernels apply causality analytically on top
        unique, inverse = torch.unique(rule[needs_mask].flatten(1), dim=0, return_inverse=True)
        tile_masks = unique.view(-1, block_q, block_k)
        ids = torch.full(dense.shape, -1, dtype=torch.int32)
        ids[0, 0, tq[needs_mask], tk[needs_mask]] = inverse.to(torch.int32)
        tile_mask_ids = torch.gather(ids, 3, indices.clamp(min=0).long())
    return BlockLayout(counts, indices, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=True,
                       tile_mask_ids=tile_mask_ids, tile_masks=tile_masks)


def a_shape(q_len: int, k_len: int | None = None, *, sink: int, window: int, block_q: int = 64,
            block_k: int = 64) -> BlockLayout:
    """Block-level A-shape (MInference): whole key blocks covering the first `sink` tokens, plus the key
    blocks that hold any of the `window` most recent keys of some query in the block; causal inside tiles."""
    q_len, k_len = _lengths(q_len, k_len)
    sink, window = _check(sink, window)
    offset = k_len - q_len
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    q_first = torch.arange(n_q) * block_q + offset            # aligned position of each block's first query
    q_last = torch.clamp(q_first + block_q - 1, max=k_len - 1)
    k_first = torch.arange(n_k) * block_k
    k_last = k_first + block_k - 1
    local = (k_last.view(1, -1) > q_first.view(-1, 1) - window) & (k_first.view(1, -1) <= q_last.view(-1, 1))
    blocks = local.clone()
    blocks[:, :_cdiv(min(sink, k_len), block_k)] = True
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=True)

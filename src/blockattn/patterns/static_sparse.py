"""Static sparse 1D patterns: vertical + slash lines, dilated windows, global tokens.

- Vertical + slash (the static form of MInference's "vertical-slash" head pattern, Jiang et al.,
  arXiv 2407.02490): every query sees a fixed set of key columns (`vertical`) and the diagonals at
  fixed distances `slash` (key = query - offset).
- Dilated sliding window (LongNet-style dilation of a local window): keys at distances
  `0, d, 2d, ...` from the query, `window` of them.
- Global tokens (Longformer / BigBird): global positions attend to everything and are attended by
  everything; every other query also keeps its own position. Combine with a local pattern by `|`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from blockattn.layout import BlockLayout, _analytic_block_support, _cdiv, _check_positive_int
from blockattn.patterns._grid import tile_layout
from blockattn.patterns.basic import _lengths

__all__ = ["vertical_slash", "dilated", "global_tokens"]


def _index_lists(name: str, values, heads: int | None, bound: tuple[int, int]) -> list[list[int]]:
    """One list of ints per head (a flat list is shared by all heads)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list of ints or a list of per-head lists, got {type(values).__name__}")
    nested = len(values) > 0 and all(isinstance(v, (list, tuple)) for v in values)
    lists = [list(v) for v in values] if nested else [list(values)]
    if heads is not None and nested and len(lists) != heads:
        raise ValueError(f"{name} has {len(lists)} per-head lists but heads={heads}")
    for lst in lists:
        for v in lst:
            if isinstance(v, bool) or not isinstance(v, int) or not bound[0] <= v < bound[1]:
                raise ValueError(f"{name} entries must be ints in [{bound[0]}, {bound[1]}), got {v!r}")
    return lists


def vertical_slash(q_len: int, k_len: int | None = None, *, vertical: Sequence, slash: Sequence,
                   block_q: int = 64, block_k: int = 64, allow_empty_rows: bool = False) -> BlockLayout:
    """Causal vertical + slash layout. `vertical`: key indices; `slash`: diagonal offsets
    `query - key >= 0` (0 is the main diagonal). Either may be a list of per-head lists. Without
    offset 0 an early query may see no key: pass `allow_empty_rows=True` if that is intended."""
    q_len, k_len = _lengths(q_len, k_len)
    verticals = _index_lists("vertical", vertical, None, (0, k_len))
    slashes = _index_lists("slash", slash, None, (0, k_len))
    heads = max(len(verticals), len(slashes))
    for name, lists in (("vertical", verticals), ("slash", slashes)):
        if len(lists) not in (1, heads):
            raise ValueError(f"{name} has {len(lists)} per-head lists; expected 1 or {heads}")
    verticals = verticals * heads if len(verticals) == 1 else verticals
    slashes = slashes * heads if len(slashes) == 1 else slashes
    is_vertical = torch.zeros(heads, k_len, dtype=torch.bool)
    is_slash = torch.zeros(heads, k_len, dtype=torch.bool)
    for h in range(heads):
        is_vertical[h, verticals[h]] = True
        is_slash[h, slashes[h]] = True
    offset = k_len - q_len
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    candidates = torch.zeros(heads, n_q, n_k, dtype=torch.bool)
    q_first = torch.arange(n_q) * block_q + offset
    q_last = (torch.arange(n_q) * block_q + block_q - 1).clamp(max=q_len - 1) + offset
    for h in range(heads):
        candidates[h, :, is_vertical[h].nonzero().flatten() // block_k] = True
        for o in slashes[h]:
            lo, hi = (q_first - o).clamp(min=0), q_last - o
            for qb in (hi >= 0).nonzero().flatten().tolist():
                candidates[h, qb, int(lo[qb]) // block_k:int(hi[qb]) // block_k + 1] = True
    candidates &= _analytic_block_support(q_len, k_len, block_q, block_k, True, None, torch.device("cpu"))[None]

    def allowed(h, q_idx, k_idx):
        distance = q_idx + offset - k_idx
        return (distance >= 0) & (is_vertical[h, k_idx] | is_slash[h, distance.clamp(min=0)])

    return tile_layout(q_len, k_len, block_q, block_k, candidates, allowed, allow_empty_rows=allow_empty_rows)


def dilated(q_len: int, k_len: int | None = None, *, window: int, dilation: int, causal: bool = True,
            block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Dilated sliding window: `window` keys spaced by `dilation`. Causal: distances
    `0, d, ..., (window-1)d` back; two-sided: `window // 2` steps back and `window - 1 - window // 2` ahead."""
    q_len, k_len = _lengths(q_len, k_len)
    window, dilation = _check_positive_int("window", window), _check_positive_int("dilation", dilation)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    back, ahead = ((window - 1) * dilation, 0) if causal else \
        ((window // 2) * dilation, (window - 1 - window // 2) * dilation)
    offset = k_len - q_len
    support = _analytic_block_support(q_len, k_len, block_q, block_k, False, (back, ahead), torch.device("cpu"))

    def allowed(h, q_idx, k_idx):
        distance = q_idx + offset - k_idx
        return (distance <= back) & (distance >= -ahead) & (distance % dilation == 0)

    return tile_layout(q_len, k_len, block_q, block_k, support[None], allowed)


def global_tokens(q_len: int, k_len: int | None = None, *, indices: Sequence[int], causal: bool = False,
                  block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Global positions (in the key frame) attend to all keys and are seen by all queries; every query
    also sees itself. `causal=True` keeps only keys at or before the query."""
    q_len, k_len = _lengths(q_len, k_len)
    (index_list,) = _index_lists("indices", list(indices), None, (0, k_len))
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    is_global = torch.zeros(k_len, dtype=torch.bool)
    is_global[index_list] = True
    offset = k_len - q_len
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    q_global = torch.nn.functional.pad(is_global[offset:], (0, n_q * block_q - q_len)).view(n_q, block_q).any(1)
    candidates = torch.zeros(n_q, n_k, dtype=torch.bool)
    candidates[:, is_global.nonzero().flatten() // block_k] = True
    candidates[q_global] = True
    candidates |= _analytic_block_support(q_len, k_len, block_q, block_k, False, (0, 0), torch.device("cpu"))
    if causal:
        candidates &= _analytic_block_support(q_len, k_len, block_q, block_k, True, None, torch.device("cpu"))

    def allowed(h, q_idx, k_idx):
        pos = q_idx + offset
        keep = is_global[k_idx] | is_global[pos] | (k_idx == pos)
        return keep & (k_idx <= pos) if causal else keep

    return tile_layout(q_len, k_len, block_q, block_k, candidates[None], allowed)

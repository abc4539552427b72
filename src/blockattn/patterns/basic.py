"""The layouts every benchmark needs: full, causal, sliding window, seeded random blocks, per-head stacks."""
from __future__ import annotations

import torch

from blockattn.layout import BlockLayout, _analytic_block_support, _cdiv, _check_positive_int


def _lengths(q_len, k_len):
    q_len = _check_positive_int("q_len", q_len)
    return q_len, q_len if k_len is None else _check_positive_int("k_len", k_len)


def full(q_len: int, k_len: int | None = None, *, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Every query attends to every key (dense attention, tiled)."""
    q_len, k_len = _lengths(q_len, k_len)
    blocks = torch.ones(_cdiv(q_len, block_q), _cdiv(k_len, block_k), dtype=torch.bool)
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k)


def causal(q_len: int, k_len: int | None = None, *, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Causal attention, bottom-right aligned when `q_len < k_len` (decode, chunked prefill)."""
    q_len, k_len = _lengths(q_len, k_len)
    blocks = torch.ones(_cdiv(q_len, block_q), _cdiv(k_len, block_k), dtype=torch.bool)
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=True)


def sliding_window(q_len: int, k_len: int | None = None, *, window, causal: bool = True, block_q: int = 64,
                   block_k: int = 64) -> BlockLayout:
    """Each query sees the `window` keys ending at itself (causal) or `window` keys on each side
    (two-sided). `window` may also be a pair `(left, right)` for an asymmetric band."""
    q_len, k_len = _lengths(q_len, k_len)
    if isinstance(window, int) and not isinstance(window, bool):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        band = (window - 1, 0) if causal else (window, window)
    elif isinstance(window, (tuple, list)) and len(window) == 2:
        band = tuple(window)
    else:
        raise ValueError(f"window must be an int or a pair (left, right), got {window!r}")
    blocks = torch.ones(_cdiv(q_len, block_q), _cdiv(k_len, block_k), dtype=torch.bool)
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                                  causal=causal, window=band)


def random_blocks(q_len: int, k_len: int | None = None, *, density: float, causal: bool = True, heads: int = 1,
                  seed: int = 0, block_q: int = 64, block_k: int = 64) -> BlockLayout:
    """Seeded random block layout, a different one per head.

    With `causal=True`, `density` is the fraction of the causally allowed tiles kept, and the
    diagonal tiles (those containing each query's own position) are always kept so that no
    row is empty; otherwise it is the fraction of all tiles, with at least one tile per row.
    """
    q_len, k_len = _lengths(q_len, k_len)
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density must lie in (0, 1], got {density}")
    heads = _check_positive_int("heads", heads)
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    generator = torch.Generator().manual_seed(seed)
    allowed = _analytic_block_support(q_len, k_len, block_q, block_k, causal, None, torch.device("cpu"))
    allowed = allowed.expand(heads, n_q, n_k)
    # keep exactly round(density * allowed) tiles per head: rank random scores among allowed tiles
    scores = torch.rand(heads, n_q, n_k, generator=generator).masked_fill(~allowed, 2.0)
    if causal:
        # the last allowed key block of each query block holds its diagonal: always kept
        last = (allowed.int() * torch.arange(1, n_k + 1)).argmax(-1, keepdim=True)
        required = torch.zeros_like(allowed).scatter_(-1, last, True) & allowed
    else:
        required = torch.zeros_like(allowed).scatter_(-1, scores.argmin(-1, keepdim=True), True)
    scores = scores.masked_fill(required, -1.0)
    per_head = allowed[0].sum()
    keep_count = torch.clamp(torch.round(density * per_head), min=int(required[0].sum())).long()
    order = scores.flatten(1).argsort(dim=1)
    chosen = torch.zeros(heads, n_q * n_k, dtype=torch.bool)
    chosen.scatter_(1, order[:, :keep_count], True)
    blocks = chosen.view(heads, n_q, n_k)[None]
    return BlockLayout.from_dense(blocks, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=causal)


def per_head(layouts: list[BlockLayout]) -> BlockLayout:
    """Stack single-head layouts (same lengths and blocks) into one layout with a head each; layouts
    with different token rules keep them through tile masks (`BlockLayout.cat`)."""
    if not layouts:
        raise ValueError("per_head needs at least one layout")
    first = layouts[0]
    for i, layout in enumerate(layouts):
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layouts[{i}] must be a BlockLayout, got {type(layout).__name__}")
        if (layout.q_len, layout.k_len, layout.block_q, layout.block_k, layout.batch, layout.heads) != \
                (first.q_len, first.k_len, first.block_q, first.block_k, 1, 1):
            raise ValueError(f"layouts[{i}] must be a single-head layout with the lengths and blocks of layouts[0]")
    return BlockLayout.cat(layouts, dim=1)

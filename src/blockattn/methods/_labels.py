"""Layouts from token labels: query token i may see key token j when `allowed[label_q(i), label_k(j)]`.

Region routing (BiFormer), cluster routing (Routing Transformer) and permuted block selection
(PARO, expressed in the original token order) all produce masks of this form. The layout is built
tile by tile: which tiles hold an allowed pair comes from per-tile label presence, and only those
tiles get explicit bit masks, so no `[Lq, Lk]` tensor is built.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.layout import BlockLayout, _analytic_block_support

_TILES_AT_ONCE = 2048


def _presence(labels: Tensor, n_labels: int, tile: int) -> Tensor:
    """float `[B, H, nTiles, n_labels]`: 1 where a tile holds a token with that label."""
    batch, heads, length = labels.shape
    n_tiles = -(-length // tile)
    tile_of = (torch.arange(length, device=labels.device) // tile).expand(batch, heads, length)
    flat = tile_of * n_labels + labels.long()
    out = torch.zeros(batch, heads, n_tiles * n_labels, device=labels.device)
    out.scatter_(2, flat, 1.0)
    return out.view(batch, heads, n_tiles, n_labels)


def label_layout(q_labels: Tensor, k_labels: Tensor, allowed: Tensor, *, block_q: int, block_k: int,
                 causal: bool, diagonal: bool = False, allow_empty_rows: bool = False) -> BlockLayout:
    """Layout of the token mask `allowed[b, h, q_labels[b, h, i], k_labels[b, h, j]]`.

    q_labels: int `[B, H, Lq]` in `[0, Cq)`; k_labels: int `[B, H, Lk]` in `[0, Ck)`; allowed: bool
    `[B, H, Cq, Ck]`. `causal` removes future keys (bottom-right aligned); `diagonal` always keeps
    each query's own position (the key at the same aligned position).
    """
    batch, heads, q_len = q_labels.shape
    k_len = k_labels.shape[2]
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    offset = k_len - q_len
    device = q_labels.device
    q_pres = _presence(q_labels, allowed.shape[2], block_q)
    k_pres = _presence(k_labels, allowed.shape[3], block_k)
    listed = (q_pres @ allowed.float() @ k_pres.transpose(-1, -2)) > 0
    # a tile holding no disallowed label pair needs no mask, unless causality cuts through it
    full = listed & ((q_pres @ (~allowed).float() @ k_pres.transpose(-1, -2)) == 0)
    support = _analytic_block_support(q_len, k_len, block_q, block_k, causal, None, q_labels.device)
    listed &= support
    if causal:
        q_first = torch.arange(n_q, device=device) * block_q + offset
        k_last = ((torch.arange(n_k, device=device) + 1) * block_k).clamp(max=k_len) - 1
        full &= (k_last.view(1, -1) <= q_first.view(-1, 1))
    if diagonal:
        listed |= _analytic_block_support(q_len, k_len, block_q, block_k, True, (0, 0), q_labels.device)
    full &= listed
    b, h, qb, kb = (listed & ~full).nonzero(as_tuple=True)
    # pad the labels with a sentinel label that allows nothing, so edge tiles index safely
    q_pad = torch.nn.functional.pad(q_labels.long(), (0, n_q * block_q - q_len), value=allowed.shape[2])
    k_pad = torch.nn.functional.pad(k_labels.long(), (0, n_k * block_k - k_len), value=allowed.shape[3])
    allowed_pad = torch.nn.functional.pad(allowed, (0, 1, 0, 1), value=False)
    masks = torch.empty(len(b), block_q, block_k, dtype=torch.bool, device=device)
    rows_in = torch.arange(block_q, device=device)
    cols_in = torch.arange(block_k, device=device)
    for at in range(0, len(b), _TILES_AT_ONCE):
        sl = slice(at, at + _TILES_AT_ONCE)
        tb, th, tq, tk = b[sl], h[sl], qb[sl], kb[sl]
        rows = tq.view(-1, 1) * block_q + rows_in
        cols = tk.view(-1, 1) * block_k + cols_in
        ql = q_pad[tb.view(-1, 1), th.view(-1, 1), rows]
        kl = k_pad[tb.view(-1, 1), th.view(-1, 1), cols]
        tile = allowed_pad[tb.view(-1, 1, 1), th.view(-1, 1, 1), ql.unsqueeze(2), kl.unsqueeze(1)]
        aligned = (rows + offset).unsqueeze(2)
        if causal:
            tile &= cols.unsqueeze(1) <= aligned
        if diagonal:
            tile |= (cols.unsqueeze(1) == aligned) & (rows < q_len).unsqueeze(2)
        masks[sl] = tile
    # the masks hold causality already; the flag lets is_causal() and the kernels know it without them
    return BlockLayout.from_tile_masks((b, h, qb, kb), masks, full=full, q_len=q_len, k_len=k_len, block_q=block_q,
                                       block_k=block_k, causal=causal, allow_empty_rows=allow_empty_rows)

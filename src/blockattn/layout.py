"""BlockLayout: which key blocks each query block attends to, and which tokens inside them.

The one data structure every part of blockattn shares. Patterns build it, methods select it,
kernels compute exactly its tiles. Shapes use `B|1` and `H|1`: the batch and head dimensions
may be 1 and then broadcast over the inputs' batch and heads.

Three levels describe the token mask, and a kernel applies them per tile:

1. Block lists: for every (batch, head, query block) a sorted list of key-block ids
   (`kv_counts [B|1, H|1, nQ]`, `kv_indices [B|1, H|1, nQ, maxK]` padded with -1).
2. Analytic constraints shared by all tiles: `causal` (bottom-right aligned, as in
   FlashAttention: with `q_len < k_len` the queries are the last `q_len` positions) and
   `window=(left, right)`: query i keeps key j when `i' - left <= j <= i' + right` where
   `i' = i + k_len - q_len` is the query's position in the key frame.
3. Optional explicit bit masks for tiles whose shape is not analytic: `tile_mask_ids
   [B|1, H|1, nQ, maxK]` (-1: no explicit mask) into `tile_masks [M, block_q, block_k]`.
   Full tiles carry no mask.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["BlockLayout"]

_TILE_CHUNK = 4096  # tiles materialised at once when token masks are built tile by tile


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" and "cuda:0" name the same device when the current device is 0
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def _check_window(window) -> tuple[int, int] | None:
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in window)):
        raise ValueError(f"window must be None or a pair (left, right) of non-negative ints, got {window!r}")
    return int(window[0]), int(window[1])


class BlockLayout:
    """A block-sparse attention layout (see the module docstring for the three levels).

    Most users build one with `from_dense`, `from_token_mask` or a `blockattn.patterns`
    function; this constructor takes the block lists directly and validates them.

    Args:
        kv_counts: int [B|1, H|1, nQ], number of key blocks listed per query block.
        kv_indices: int [B|1, H|1, nQ, maxK], sorted key-block ids, padding (-1) after the count.
        q_len, k_len: token lengths the layout is built for.
        block_q, block_k: tile size in tokens (the last block of each axis may be shorter).
        causal: apply the bottom-right aligned causal constraint inside tiles.
        window: `(left, right)` token window in the aligned frame, or None.
        tile_mask_ids: int [B|1, H|1, nQ, maxK] or None; -1 for tiles without an explicit mask.
        tile_masks: bool [M, block_q, block_k] or None, indexed by `tile_mask_ids`.
        allow_empty_rows: allow query rows that attend to no key (they produce zeros and
            `lse = -inf`); otherwise such a layout is rejected.
    """

    def __init__(self, kv_counts: Tensor, kv_indices: Tensor, *, q_len: int, k_len: int,
                 block_q: int = 64, block_k: int = 64, causal: bool = False,
                 window: tuple[int, int] | None = None, tile_mask_ids: Tensor | None = None,
                 tile_masks: Tensor | None = None, allow_empty_rows: bool = False):
        self._derived = {}
        self.q_len = _check_positive_int("q_len", q_len)
        self.k_len = _check_positive_int("k_len", k_len)
        self.block_q = _check_positive_int("block_q", block_q)
        self.block_k = _check_positive_int("block_k", block_k)
        if not isinstance(causal, bool):
            raise ValueError(f"causal must be a bool, got {causal!r}")
        self.causal = causal
        self.window = _check_window(window)
        self.allow_empty_rows = bool(allow_empty_rows)
        n_q, n_k = self.num_q_blocks, self.num_k_blocks

        for name, t in (("kv_counts", kv_counts), ("kv_indices", kv_indices)):
            if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64, torch.int16):
                raise ValueError(f"{name} must be an integer tensor, got {type(t).__name__}"
                                 f"{'' if not isinstance(t, Tensor) else ' of ' + str(t.dtype)}")
        if kv_counts.dim() != 3 or kv_counts.shape[2] != n_q:
            raise ValueError(f"kv_counts must have shape [B|1, H|1, nQ={n_q}] for q_len={q_len}, "
                             f"block_q={block_q}; got {list(kv_counts.shape)}")
        if kv_indices.dim() != 4 or kv_indices.shape[:3] != kv_counts.shape:
            raise ValueError(f"kv_indices must have shape [{', '.join(map(str, kv_counts.shape))}, maxK]; "
                             f"got {list(kv_indices.shape)}")
        kv_counts = kv_counts.to(torch.int32).contiguous()
        kv_indices = kv_indices.to(torch.int32).contiguous()
        max_k = kv_indices.shape[3]
        if kv_counts.numel() and (int(kv_counts.min()) < 0 or int(kv_counts.max()) > max_k):
            raise ValueError(f"kv_counts must lie in [0, maxK={max_k}]")
        valid = torch.arange(max_k, device=kv_indices.device) < kv_counts.unsqueeze(-1)
        if valid.any():
            listed = kv_indices[valid]
            if int(listed.min()) < 0 or int(listed.max()) >= n_k:
                raise ValueError(f"kv_indices out of range: key-block ids must lie in [0, {n_k}) "
                                 f"for k_len={k_len}, block_k={block_k}")
            if max_k > 1:
                increasing = (kv_indices[..., 1:] > kv_indices[..., :-1]) | ~valid[..., 1:]
                if not bool(increasing.all()):
                    raise ValueError("kv_indices must be strictly increasing (sorted, no repeats) "
                                     "within each query block's list")
        self.kv_counts = kv_counts
        self.kv_indices = torch.where(valid, kv_indices, torch.full_like(kv_indices, -1))

        if (tile_mask_ids is None) != (tile_masks is None):
            raise ValueError("tile_mask_ids and tile_masks must be given together")
        if tile_masks is not None:
            if not isinstance(tile_masks, Tensor) or tile_masks.dtype != torch.bool or tile_masks.dim() != 3 \
                    or tuple(tile_masks.shape[1:]) != (block_q, block_k):
                raise ValueError(f"tile_masks must be a bool tensor [M, block_q={block_q}, block_k={block_k}]")
            if not isinstance(tile_mask_ids, Tensor) or tile_mask_ids.shape != kv_indices.shape \
                    or tile_mask_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"tile_mask_ids must be an int tensor shaped like kv_indices "
                                 f"{list(kv_indices.shape)}")
            tile_mask_ids = torch.where(valid, tile_mask_ids.to(torch.int32), -1).contiguous()
            if tile_mask_ids.numel() and (int(tile_mask_ids.min()) < -1
                                          or int(tile_mask_ids.max()) >= tile_masks.shape[0]):
                raise ValueError(f"tile_mask_ids must lie in [-1, {tile_masks.shape[0]})")
            tile_masks = tile_masks.contiguous()
        self.tile_mask_ids = tile_mask_ids
        self.tile_masks = tile_masks

        if not self.allow_empty_rows:
            empty = ~self.row_has_keys()
            if bool(empty.any()):
                b, h, i = (int(x) for x in empty.nonzero()[0])
                raise ValueError(f"query row {i} (batch {b}, head {h}) attends to no key; pass "
                                 f"allow_empty_rows=True if that is intended (its output is zero)")

    # ------------------------------------------------------------------ shape facts
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.q_len, self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return _cdiv(self.k_len, self.block_k)

    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def max_blocks(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def offset(self) -> int:
        """Position of query 0 in the key frame (bottom-right alignment)."""
        return self.k_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def __repr__(self) -> str:
        extra = [f"causal" if self.causal else None,
                 f"window={self.window}" if self.window else None,
                 f"tile_masks={self.tile_masks.shape[0]}" if self.tile_masks is not None else None]
        extra = ", ".join(e for e in extra if e)
        return (f"BlockLayout(q_len={self.q_len}, k_len={self.k_len}, block=({self.block_q}, {self.block_k}), "
                f"B|H=({self.batch}, {self.heads}), density={self.density():.3f}{', ' + extra if extra else ''})")

    def to(self, device) -> BlockLayout:
        """This layout on `device`: `self` when it is already there, else a copy (not re-validated)."""
        device = torch.device(device)
        if _same_device(self.device, device):
            return self
        return self._replace(kv_counts=self.kv_counts.to(device), kv_indices=self.kv_indices.to(device),
                             tile_mask_ids=None if self.tile_mask_ids is None else self.tile_mask_ids.to(device),
                             tile_masks=None if self.tile_masks is None else self.tile_masks.to(device))

    def _replace(self, **changes) -> BlockLayout:
        """A layout with some fields changed, built without validation: for internal callers whose
        changes keep a valid layout valid (moving it, broadcasting it)."""
        fields = dict(kv_counts=self.kv_counts, kv_indices=self.kv_indices, q_len=self.q_len,
                      k_len=self.k_len, block_q=self.block_q, block_k=self.block_k, causal=self.causal,
                      window=self.window, tile_mask_ids=self.tile_mask_ids, tile_masks=self.tile_masks,
                      allow_empty_rows=self.allow_empty_rows)
        fields.update(changes)
        return BlockLayout._trusted(**fields)

    @classmethod
    def _trusted(cls, **fields) -> BlockLayout:
        """A layout from fields already known to be valid (int32 contiguous lists, -1 padding): the hot
        path of kernels and methods, which must not pay the public constructor's checks per call."""
        layout = object.__new__(cls)
        layout.__dict__.update(fields)
        layout._derived = {}
        return layout

    def _memo(self, key, build):
        """`build()` computed once per layout (layouts are immutable): per-call kernel inputs such as the
        transposed lists or packed tile masks."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def expand(self, batch: int, heads: int) -> BlockLayout:
        """The same layout with explicit batch and head dimensions (no copy)."""
        b, h = self.batch, self.heads
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"a layout with B|H=({b}, {h}) cannot broadcast to ({batch}, {heads})")
        if (b, h) == (batch, heads):
            return self
        shape4 = (batch, heads, self.num_q_blocks, self.max_blocks)
        return self._replace(
            kv_counts=self.kv_counts.expand(*shape4[:3]), kv_indices=self.kv_indices.expand(shape4),
            tile_mask_ids=None if self.tile_mask_ids is None else self.tile_mask_ids.expand(shape4))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dense(cls, block_mask: Tensor, *, q_len: int, k_len: int, block_q: int = 64, block_k: int = 64,
                   causal: bool = False, window: tuple[int, int] | None = None,
                   allow_empty_rows: bool = False) -> BlockLayout:
        """Layout from a bool block matrix `[B|1, H|1, nQ, nK]` (or `[nQ, nK]`).

        Tiles that the analytic constraints (`causal`, `window`) leave empty are dropped, so a
        full block matrix with `causal=True` computes only the causal tiles.
        """
        if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a bool tensor, got "
                             f"{block_mask.dtype if isinstance(block_mask, Tensor) else type(block_mask).__name__}")
        if block_mask.dim() == 2:
            block_mask = block_mask[None, None]
        q_len, k_len = _check_positive_int("q_len", q_len), _check_positive_int("k_len", k_len)
        block_q, block_k = _check_positive_int("block_q", block_q), _check_positive_int("block_k", block_k)
        n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        if block_mask.dim() != 4 or tuple(block_mask.shape[2:]) != (n_q, n_k):
            raise ValueError(f"block_mask must have shape [B|1, H|1, nQ={n_q}, nK={n_k}] for q_len={q_len}, "
                             f"k_len={k_len}, block_q={block_q}, block_k={block_k}; got {list(block_mask.shape)}")
        window = _check_window(window)
        if causal or window is not None:
            block_mask = block_mask & _analytic_block_support(q_len, k_len, block_q, block_k, causal, window,
                                                              block_mask.device)
        counts, indices = _block_lists(block_mask)
        return cls(counts, indices, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k,
                   causal=causal, window=window, allow_empty_rows=allow_empty_rows)

    @classmethod
    def from_token_mask(cls, token_mask: Tensor | Callable, *, block_q: int = 64, block_k: int = 64,
                        q_len: int | None = None, k_len: int | None = None, batch: int = 1, heads: int = 1,
                        allow_empty_rows: bool = False) -> BlockLayout:
        """Layout from a bool token mask `[B|1, H|1, Lq, Lk]` (or `[Lq, Lk]`), or from a FlexAttention-style
        `mask_mod(b, h, q_idx, kv_idx) -> bool` with `q_len`, `k_len`, `batch` and `heads` given.

        Tiles with no allowed pair are dropped, fully allowed tiles carry no mask, and the rest
        keep an explicit bit mask (identical masks are stored once). A `mask_mod` is evaluated
        one query block at a time, so the full `[Lq, Lk]` mask is never built.
        """
        block_q, block_k = _check_positive_int("block_q", block_q), _check_positive_int("block_k", block_k)
        if callable(token_mask) and not isinstance(token_mask, Tensor):
            if q_len is None or k_len is None:
                raise ValueError("from_token_mask with a mask_mod needs q_len and k_len")
            q_len, k_len = _check_positive_int("q_len", q_len), _check_positive_int("k_len", k_len)
            mask_mod = token_mask
            device = torch.device("cpu")
            b_idx = torch.arange(batch).view(batch, 1, 1, 1)
            h_idx = torch.arange(heads).view(1, heads, 1, 1)
            kv_idx = torch.arange(k_len).view(1, 1, 1, k_len)

            def rows(start, stop):
                q_idx = torch.arange(start, stop).view(1, 1, -1, 1)
                out = mask_mod(b_idx, h_idx, q_idx, kv_idx)
                if not isinstance(out, Tensor) or out.dtype != torch.bool:
                    raise ValueError("mask_mod must return a bool tensor")
                return out.expand(batch, heads, stop - start, k_len)
        else:
            if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
                raise ValueError("token_mask must be a bool tensor [B|1, H|1, Lq, Lk] or a mask_mod callable")
            if token_mask.dim() == 2:
                token_mask = token_mask[None, None]
            if token_mask.dim() != 4:
                raise ValueError(f"token_mask must have 4 dims [B|1, H|1, Lq, Lk], got {list(token_mask.shape)}")
            batch, heads, q_len, k_len = token_mask.shape
            if q_len < 1 or k_len < 1:
                raise ValueError(f"token_mask must have non-empty Lq and Lk, got {list(token_mask.shape)}")
            device = token_mask.device

            def rows(start, stop):
                return token_mask[:, :, start:stop]

        n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        pad_k = n_k * block_k - k_len
        block_any = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool, device=device)
        block_full = torch.zeros_like(block_any)
        partial_tiles = []  # (b, h, qb, kb) -> [block_q, block_k] masks
        for qb in range(n_q):
            start, stop = qb * block_q, min(q_len, (qb + 1) * block_q)
            chunk = rows(start, stop)
            chunk = torch.nn.functional.pad(chunk, (0, pad_k, 0, block_q - (stop - start)))
            tiles = chunk.view(batch, heads, block_q, n_k, block_k).permute(0, 1, 3, 2, 4)  # [B,H,nK,bq,bk]
            k_blocks = torch.arange(n_k, device=device)
            valid = _tile_bounds(torch.full_like(k_blocks, qb), k_blocks, q_len, k_len, block_q, block_k)
            block_any[:, :, qb] = tiles.any(dim=(-1, -2))
            block_full[:, :, qb] = (tiles | ~valid).all(dim=-1).all(dim=-1)
            partial = block_any[:, :, qb] & ~block_full[:, :, qb]
            if partial.any():
                partial_tiles.append((qb, partial.nonzero(), tiles[partial]))
        where = torch.cat([t[1] for t in partial_tiles]) if partial_tiles else \
            torch.zeros(0, 3, dtype=torch.long, device=device)
        q_blocks = torch.cat([torch.full((len(t[1]),), t[0], device=device) for t in partial_tiles]) \
            if partial_tiles else torch.zeros(0, dtype=torch.long, device=device)
        masks = torch.cat([t[2] for t in partial_tiles]) if partial_tiles else None
        return cls.from_tile_masks((where[:, 0], where[:, 1], q_blocks, where[:, 2]), masks, q_len=q_len,
                                   k_len=k_len, block_q=block_q, block_k=block_k, full=block_any & block_full,
                                   allow_empty_rows=allow_empty_rows)

    # ------------------------------------------------------------------ token-level views
    def tile_token_masks(self, b: Tensor, h: Tensor, q_block: Tensor, k_block: Tensor) -> Tensor:
        """bool `[T, block_q, block_k]`: the allowed token pairs of tiles (b, h, q_block, k_block),
        each `[T]`, assuming the tile is listed. Out-of-range rows and columns are False.
        Explicit tile masks are looked up by position in the block list."""
        allowed = _tile_bounds(q_block, k_block, self.q_len, self.k_len, self.block_q, self.block_k)
        rows = q_block.view(-1, 1, 1) * self.block_q + torch.arange(self.block_q, device=q_block.device).view(1, -1, 1)
        cols = k_block.view(-1, 1, 1) * self.block_k + torch.arange(self.block_k, device=k_block.device).view(1, 1, -1)
        aligned = rows + self.offset
        if self.causal:
            allowed = allowed & (cols <= aligned)
        if self.window is not None:
            allowed = allowed & (cols >= aligned - self.window[0]) & (cols <= aligned + self.window[1])
        if self.tile_masks is not None:
            slot = _slot_of(self.kv_indices, self.kv_counts, b, h, q_block, k_block)
            ids = self.tile_mask_ids[b.clamp(max=self.batch - 1) if self.batch > 1 else 0,
                                     h.clamp(max=self.heads - 1) if self.heads > 1 else 0, q_block, slot]
            explicit = ids >= 0
            if explicit.any():
                allowed = allowed.clone()
                allowed[explicit] &= self.tile_masks[ids[explicit].long()]
        return allowed

    def listed_tiles(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(b, h, q_block, k_block) of every listed tile, each `[T]` (over the stored B|1, H|1)."""
        valid = torch.arange(self.max_blocks, device=self.device) < self.kv_counts.unsqueeze(-1)
        b, h, qb, slot = valid.nonzero(as_tuple=True)
        return b, h, qb, self.kv_indices[b, h, qb, slot].long()

    def to_dense(self) -> Tensor:
        """bool `[B|1, H|1, nQ, nK]`: which tiles are listed."""
        dense = torch.zeros(self.batch, self.heads, self.num_q_blocks, self.num_k_blocks + 1,
                            dtype=torch.bool, device=self.device)
        index = torch.where(self.kv_indices >= 0, self.kv_indices, self.num_k_blocks).long()
        dense.scatter_(3, index, True)
        return dense[..., :-1]

    def to_token_mask(self) -> Tensor:
        """bool `[B|1, H|1, Lq, Lk]`: the exact token mask the kernels compute (for tests and small sizes)."""
        return self.token_mask_rows(0, self.num_q_blocks)

    def token_mask_rows(self, first_block: int, stop_block: int) -> Tensor:
        """bool `[B|1, H|1, rows, Lk]`: the token mask of query blocks `[first_block, stop_block)` only,
        so long layouts can be inspected a band of rows at a time."""
        nq, nk = stop_block - first_block, self.num_k_blocks
        mask = torch.zeros(self.batch, self.heads, nq, nk, self.block_q, self.block_k, dtype=torch.bool,
                           device=self.device)
        b, h, qb, kb = self.listed_tiles()
        band = (qb >= first_block) & (qb < stop_block)
        b, h, qb, kb = b[band], h[band], qb[band], kb[band]
        for at in range(0, len(b), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            mask[b[sl], h[sl], qb[sl] - first_block, kb[sl]] = self.tile_token_masks(b[sl], h[sl], qb[sl], kb[sl])
        mask = mask.permute(0, 1, 2, 4, 3, 5).reshape(self.batch, self.heads, nq * self.block_q, nk * self.block_k)
        rows = min(self.q_len, stop_block * self.block_q) - first_block * self.block_q
        return mask[:, :, :rows, :self.k_len]

    def row_has_keys(self) -> Tensor:
        """bool `[B|1, H|1, Lq]`: whether each query row attends to at least one key."""
        if self.tile_masks is None and self.window is None:
            # Without masks or a window every listed tile keeps whole key columns, so a row has keys
            # iff its block lists any tile (and, causal, the first listed block starts at or before
            # the row's aligned position): O(Lq) instead of a pass over every tile's rows.
            rows = torch.arange(self.num_q_blocks * self.block_q, device=self.device)[:self.q_len]
            listed = self.kv_counts > 0
            has = listed.repeat_interleave(self.block_q, dim=-1)[..., :self.q_len]
            if self.causal and self.max_blocks:  # (no list slots at all: no row has keys already)
                first = self.kv_indices[..., 0].clamp(min=0).repeat_interleave(self.block_q, dim=-1)
                has = has & (first[..., :self.q_len] * self.block_k <= rows + self.offset)
            return has
        hits = torch.zeros(self.batch * self.heads * self.num_q_blocks, self.block_q, dtype=torch.int32,
                           device=self.device)
        b, h, qb, kb = self.listed_tiles()
        flat = (b * self.heads + h) * self.num_q_blocks + qb
        for at in range(0, len(b), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            if self.tile_masks is None:
                rows = self._analytic_rows_nonempty(qb[sl], kb[sl])
            else:
                rows = self.tile_token_masks(b[sl], h[sl], qb[sl], kb[sl]).any(dim=-1)
            hits.index_add_(0, flat[sl], rows.to(torch.int32))
        return (hits > 0).view(self.batch, self.heads, -1)[..., :self.q_len]

    def _analytic_rows_nonempty(self, q_block: Tensor, k_block: Tensor) -> Tensor:
        """bool `[T, block_q]`: rows of each tile that keep at least one key under the analytic
        constraints, from interval arithmetic (no `[block_q, block_k]` tile is built)."""
        rows = q_block.view(-1, 1) * self.block_q + torch.arange(self.block_q, device=q_block.device)
        aligned = rows + self.offset
        lo = (k_block * self.block_k).view(-1, 1).expand_as(rows)
        hi = ((k_block + 1) * self.block_k).clamp(max=self.k_len).view(-1, 1) - 1
        if self.causal:
            hi = torch.minimum(hi, aligned)
        if self.window is not None:
            lo = torch.maximum(lo, aligned - self.window[0])
            hi = torch.minimum(hi, aligned + self.window[1])
        return (lo <= hi) & (rows < self.q_len)

    # ------------------------------------------------------------------ algebra and statistics
    def density(self, relative_to: str = "full") -> float:
        """Fraction of tiles computed: against all `nQ x nK` tiles (`"full"`) or against the tiles a
        causal layout of the same lengths computes (`"causal"`)."""
        listed = float(self.kv_counts.sum())
        if relative_to == "full":
            total = self.num_q_blocks * self.num_k_blocks
        elif relative_to == "causal":
            total = int(_analytic_block_support(self.q_len, self.k_len, self.block_q, self.block_k, True, None,
                                                self.device).sum())
        else:
            raise ValueError(f"relative_to must be 'full' or 'causal', got {relative_to!r}")
        return listed / (total * self.batch * self.heads)

    def token_density(self) -> float:
        """Fraction of the `Lq x Lk` token pairs the layout allows (tile by tile, no `[Lq, Lk]` tensor)."""
        allowed = 0
        b, h, qb, kb = self.listed_tiles()
        for at in range(0, len(b), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            allowed += int(self.tile_token_masks(b[sl], h[sl], qb[sl], kb[sl]).sum())
        return allowed / (self.q_len * self.k_len * self.batch * self.heads)

    def _check_compatible(self, other, op: str):
        if not isinstance(other, BlockLayout):
            raise TypeError(f"layout {op} expects a BlockLayout, got {type(other).__name__}")
        mine = (self.q_len, self.k_len, self.block_q, self.block_k)
        theirs = (other.q_len, other.k_len, other.block_q, other.block_k)
        if mine != theirs:
            raise ValueError(f"layout {op}: shapes differ (q_len, k_len, block_q, block_k) {mine} vs {theirs}")
        for name, x, y in (("batch", self.batch, other.batch), ("heads", self.heads, other.heads)):
            if x != y and 1 not in (x, y):
                raise ValueError(f"layout {op}: {name} dimensions {x} and {y} do not broadcast")

    def _combine(self, other: BlockLayout, op: str) -> BlockLayout:
        self._check_compatible(other, "|" if op == "or" else "&")
        batch, heads = max(self.batch, other.batch), max(self.heads, other.heads)
        a, b = self.expand(batch, heads), other.expand(batch, heads)
        dense_a, dense_b = a.to_dense(), b.to_dense()
        blocks = dense_a | dense_b if op == "or" else dense_a & dense_b
        same_rule = (self.causal, self.window) == (other.causal, other.window)
        if same_rule and self.tile_masks is None and other.tile_masks is None:
            return BlockLayout.from_dense(blocks, q_len=self.q_len, k_len=self.k_len, block_q=self.block_q,
                                          block_k=self.block_k, causal=self.causal, window=self.window,
                                          allow_empty_rows=self.allow_empty_rows or other.allow_empty_rows)
        # General case: combine tile by tile and keep explicit masks for the tiles that need them.
        counts, indices = _block_lists(blocks)
        template = BlockLayout(counts, indices, q_len=self.q_len, k_len=self.k_len, block_q=self.block_q,
                               block_k=self.block_k, allow_empty_rows=True)
        tb, th, tq, tk = template.listed_tiles()
        masks = torch.empty(len(tb), self.block_q, self.block_k, dtype=torch.bool, device=self.device)
        for at in range(0, len(tb), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            ma = a.tile_token_masks(tb[sl], th[sl], tq[sl], tk[sl]) & dense_a[tb[sl], th[sl], tq[sl], tk[sl]].view(-1, 1, 1)
            mb = b.tile_token_masks(tb[sl], th[sl], tq[sl], tk[sl]) & dense_b[tb[sl], th[sl], tq[sl], tk[sl]].view(-1, 1, 1)
            masks[sl] = ma | mb if op == "or" else ma & mb
        return _layout_from_tile_masks(template, (tb, th, tq, tk), masks,
                                       allow_empty_rows=self.allow_empty_rows or other.allow_empty_rows)

    def __or__(self, other: BlockLayout) -> BlockLayout:
        return self._combine(other, "or")

    def __and__(self, other: BlockLayout) -> BlockLayout:
        return self._combine(other, "and")

    def transpose(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per key block, the sorted query blocks that list it: (q_counts `[B|1, H|1, nK]`,
        q_indices `[B|1, H|1, nK, maxQ]` padded with -1, q_mask_ids `[B|1, H|1, nK, maxQ]` with each
        tile's explicit-mask id or -1, None when the layout has no explicit masks). Backward kernels
        iterate these. Computed once per layout."""
        return self._memo("transpose", self._transpose)

    def _transpose(self) -> tuple[Tensor, Tensor, Tensor | None]:
        counts, indices = _block_lists(self.to_dense().transpose(-1, -2))
        if self.tile_mask_ids is None:
            return counts, indices, None
        ids = torch.full((self.batch, self.heads, self.num_q_blocks, self.num_k_blocks), -1, dtype=torch.int32,
                         device=self.device)
        b, h, qb, slot = (self.tile_mask_ids >= 0).nonzero(as_tuple=True)
        ids[b, h, qb, self.kv_indices[b, h, qb, slot].long()] = self.tile_mask_ids[b, h, qb, slot]
        mask_ids = torch.gather(ids.transpose(2, 3), 3, indices.clamp(min=0).long())
        mask_ids = torch.where(indices >= 0, mask_ids, -1).to(torch.int32).contiguous()
        return counts, indices, mask_ids

    # ------------------------------------------------------------------ FlexAttention interop
    def to_block_mask(self):
        """This layout as a FlexAttention `BlockMask` (partial tiles get a `mask_mod`)."""
        from blockattn.ops.flex import layout_to_block_mask
        return layout_to_block_mask(self)

    @classmethod
    def from_block_mask(cls, block_mask, *, allow_empty_rows: bool = False) -> BlockLayout:
        """Layout from a FlexAttention `BlockMask`; partial tiles keep their `mask_mod` as explicit masks."""
        from blockattn.ops.flex import layout_from_block_mask
        return layout_from_block_mask(block_mask, allow_empty_rows=allow_empty_rows)

    # ------------------------------------------------------------------ picture
    def show(self, path: str, *, max_heads: int = 16, title: str | None = None) -> str:
        """Write a PNG of the block matrix per head (batch 0): black = computed tile, grey = tile
        with a token-level constraint or explicit mask, white = skipped."""
        from blockattn.plots import plot_layout
        return plot_layout(self, path, max_heads=max_heads, title=title)

    # ------------------------------------------------------------------ causality
    def is_causal(self) -> bool:
        """Whether no query sees a key after its own position (bottom-right aligned, as `causal`).

        Decided tile by tile: the analytic rules settle it at once (`causal`, or a window with no right
        side); otherwise only the listed tiles that reach past some query's position are looked at,
        through their token masks, a chunk of tiles at a time (O(tiles), no `[Lq, Lk]` tensor).
        """
        if self.causal or (self.window is not None and self.window[1] == 0):
            return True
        b, h, qb, kb = self.listed_tiles()
        # a tile can hold a future pair only if its last key lies after its first query's position
        k_last = ((kb + 1) * self.block_k).clamp(max=self.k_len) - 1
        reaching = k_last > qb * self.block_q + self.offset
        b, h, qb, kb = b[reaching], h[reaching], qb[reaching], kb[reaching]
        row_in = torch.arange(self.block_q, device=self.device).view(1, -1, 1)
        col_in = torch.arange(self.block_k, device=self.device).view(1, 1, -1)
        for at in range(0, len(b), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            aligned = qb[sl].view(-1, 1, 1) * self.block_q + row_in + self.offset
            future = kb[sl].view(-1, 1, 1) * self.block_k + col_in > aligned
            if bool((self.tile_token_masks(b[sl], h[sl], qb[sl], kb[sl]) & future).any()):
                return False
        return True

    # ------------------------------------------------------------------ building blocks
    @classmethod
    def from_tile_masks(cls, tiles, masks: Tensor | None = None, *, q_len: int, k_len: int, block_q: int = 64,
                        block_k: int = 64, mask_ids: Tensor | None = None, full: Tensor | None = None,
                        batch: int | None = None, heads: int | None = None, causal: bool = False,
                        window: tuple[int, int] | None = None, allow_empty_rows: bool = False,
                        trusted: bool = False) -> BlockLayout:
        """Layout listing tiles with explicit token masks, built in O(tiles) (no token mask).

        Args:
            tiles: `(b, h, q_block, k_block)`, int tensors `[T]`, each tile at most once.
            masks: bool `[T, block_q, block_k]` (True = allowed), one per tile; or, with `mask_ids`,
                `[M, block_q, block_k]` shared masks. None: the tiles are whole (no mask).
            mask_ids: int `[T]` into `masks`, -1 for a whole tile.
            full: bool `[B|1, H|1, nQ, nK]`, further tiles listed whole (no mask).
            batch, heads: the layout's B|1 and H|1 (default: from `full`, else 1 + the largest b / h).
            causal, window: analytic rules applied on top of every tile, as in the constructor.
            trusted: the caller guarantees that the masks are pairwise different and that each tile's
                mask is partial (some in-range pair allowed, some not): skips those checks (internal
                builders that classified packed bits already).

        A tile whose mask allows no in-range pair is dropped, one whose mask allows every in-range
        pair carries no mask, and identical masks are stored once. The analytic rules drop the
        tiles they leave empty.
        """
        block_q, block_k = _check_positive_int("block_q", block_q), _check_positive_int("block_k", block_k)
        q_len, k_len = _check_positive_int("q_len", q_len), _check_positive_int("k_len", k_len)
        if not isinstance(tiles, (tuple, list)) or len(tiles) != 4 or not all(isinstance(t, Tensor) for t in tiles):
            raise TypeError("tiles must be a tuple (b, h, q_block, k_block) of int tensors [T]")
        tb, th, tq, tk = (t.long().reshape(-1) for t in tiles)
        if not len(tb) == len(th) == len(tq) == len(tk):
            raise ValueError(f"tiles must be four tensors of one length, got {[len(t) for t in (tb, th, tq, tk)]}")
        n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
        device = full.device if full is not None else tb.device
        if full is not None:
            if not isinstance(full, Tensor) or full.dtype != torch.bool or full.dim() != 4 \
                    or tuple(full.shape[2:]) != (n_q, n_k):
                raise ValueError(f"full must be a bool tensor [B|1, H|1, nQ={n_q}, nK={n_k}]")
            batch = full.shape[0] if batch is None else batch
            heads = full.shape[1] if heads is None else heads
        batch = (int(tb.max()) + 1 if len(tb) else 1) if batch is None else _check_positive_int("batch", batch)
        heads = (int(th.max()) + 1 if len(th) else 1) if heads is None else _check_positive_int("heads", heads)
        if masks is not None:
            if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.dim() != 3 \
                    or tuple(masks.shape[1:]) != (block_q, block_k):
                raise ValueError(f"masks must be a bool tensor [M, block_q={block_q}, block_k={block_k}]")
            if mask_ids is None:
                if masks.shape[0] != len(tb):
                    raise ValueError(f"masks must hold one mask per tile ({len(tb)}), got {masks.shape[0]}")
                mask_ids = torch.arange(len(tb), device=device)
        elif mask_ids is not None:
            raise ValueError("mask_ids needs masks")
        ids = torch.full((len(tb),), -1, dtype=torch.long, device=device) if mask_ids is None \
            else mask_ids.long().reshape(-1).clone()
        if len(ids) != len(tb):
            raise ValueError(f"mask_ids must hold one id per tile ({len(tb)}), got {len(ids)}")
        keep = torch.ones(len(tb), dtype=torch.bool, device=device)
        has = ids >= 0
        if masks is not None and not trusted and bool(has.any()):
            # interior tiles are settled per mask; a tile in the last row or column of blocks, where part
            # of the mask lies past the lengths, is looked at on its own
            flat = masks.reshape(len(masks), -1)
            empty, whole = ~flat.any(1), flat.all(1)
            at = ids.clamp(min=0)
            empty, whole = empty[at], whole[at]
            rows, cols = q_len - (n_q - 1) * block_q, k_len - (n_k - 1) * block_k
            edge = has & (((tq == n_q - 1) & (rows < block_q)) | ((tk == n_k - 1) & (cols < block_k)))
            edge_tiles = edge.nonzero().flatten()
            for start in range(0, len(edge_tiles), _TILE_CHUNK):
                t = edge_tiles[start:start + _TILE_CHUNK]
                bounds = _tile_bounds(tq[t], tk[t], q_len, k_len, block_q, block_k)
                inside = masks[ids[t]] & bounds
                empty[t] = ~inside.flatten(1).any(1)
                whole[t] = (inside | ~bounds).flatten(1).all(1)
            keep = ~(has & empty)
            ids = torch.where(has & whole, -1, ids)
        dense = torch.zeros(batch, heads, n_q, n_k, dtype=torch.bool, device=device)
        if full is not None:
            dense |= full
        # trusted builders pass only tiles to keep: no boolean indexing (a nonzero per tensor)
        dense[(tb, th, tq, tk) if trusted else (tb[keep], th[keep], tq[keep], tk[keep])] = True
        if causal or window is not None:
            dense &= _analytic_block_support(q_len, k_len, block_q, block_k, causal, _check_window(window), device)
        counts, indices = _block_lists(dense)
        tile_mask_ids = tile_masks = None
        partial = keep & (ids >= 0)
        if bool(partial.any()):
            every = trusted and bool(partial.all())
            at = (tb, th, tq, tk) if every else (tb[partial], th[partial], tq[partial], tk[partial])
            listed_ids = ids if every else ids[partial]
            if trusted and bool((torch.bincount(listed_ids, minlength=len(masks)) > 0).all()):
                used, inverse = torch.arange(len(masks), device=device), listed_ids  # no sort
            else:
                used, inverse = torch.unique(listed_ids, return_inverse=True)
            # every mask used (the packed builders' case): no copy of what can be hundreds of MB
            kept = masks if len(used) == len(masks) else masks[used]
            tile_masks, merged = (kept.contiguous(), torch.arange(len(used), device=device)) if trusted \
                else _unique_masks(kept)
            ids_dense = torch.full(dense.shape, -1, dtype=torch.int32, device=device)
            ids_dense[at] = merged[inverse].to(torch.int32)
            tile_mask_ids = torch.gather(ids_dense, 3, indices.clamp(min=0).long())
        return cls(counts, indices, q_len=q_len, k_len=k_len, block_q=block_q, block_k=block_k, causal=causal,
                   window=window, tile_mask_ids=tile_mask_ids, tile_masks=tile_masks,
                   allow_empty_rows=allow_empty_rows)

    @classmethod
    def cat(cls, layouts, dim: int) -> BlockLayout:
        """Concatenate layouts of the same lengths and tiles along batch (`dim=0`) or heads (`dim=1`).

        The other dimension broadcasts (sizes equal or 1). Block lists are padded to the longest and
        explicit tile masks keep their ids. Layouts with different analytic rules (`causal`, `window`)
        are joined by giving the tiles their token masks (tile by tile, no token mask of the whole).
        """
        layouts = list(layouts) if isinstance(layouts, (tuple, list)) else layouts
        if not isinstance(layouts, list) or not layouts:
            raise ValueError("cat needs a non-empty list of layouts")
        for i, layout in enumerate(layouts):
            if not isinstance(layout, BlockLayout):
                raise TypeError(f"layouts[{i}] must be a BlockLayout, got {type(layout).__name__}")
        if dim not in (0, 1) or isinstance(dim, bool):
            raise ValueError(f"dim must be 0 (batch) or 1 (heads), got {dim!r}")
        first = layouts[0]
        for i, layout in enumerate(layouts):
            if (layout.q_len, layout.k_len, layout.block_q, layout.block_k) != \
                    (first.q_len, first.k_len, first.block_q, first.block_k):
                raise ValueError(f"layouts[{i}] has (q_len, k_len, block_q, block_k) "
                                 f"{(layout.q_len, layout.k_len, layout.block_q, layout.block_k)}, layouts[0] "
                                 f"{(first.q_len, first.k_len, first.block_q, first.block_k)}")
        other = 1 - dim
        size = max(l.kv_counts.shape[other] for l in layouts)
        if any(l.kv_counts.shape[other] not in (1, size) for l in layouts):
            raise ValueError(f"layouts' {('batch', 'heads')[other]} dimensions do not broadcast: "
                             f"{[l.kv_counts.shape[other] for l in layouts]}")
        if len(layouts) == 1:
            return first
        if any((l.causal, l.window) != (first.causal, first.window) for l in layouts):
            layouts = [l._with_rule_in_masks() for l in layouts]
            first = layouts[0]
        width = max(l.max_blocks for l in layouts)
        any_masks = any(l.tile_masks is not None for l in layouts)
        counts, indices, ids, masks, at = [], [], [], [], 0
        for l in layouts:
            shape = list(l.kv_indices.shape)
            shape[other] = size
            pad = width - l.max_blocks
            counts.append(l.kv_counts.expand(shape[:3]))
            indices.append(torch.nn.functional.pad(l.kv_indices.expand(shape), (0, pad), value=-1))
            if l.tile_masks is not None:
                shifted = torch.where(l.tile_mask_ids >= 0, l.tile_mask_ids + at, -1)
                ids.append(torch.nn.functional.pad(shifted.expand(shape), (0, pad), value=-1))
                masks.append(l.tile_masks)
                at += l.tile_masks.shape[0]
            elif any_masks:
                ids.append(torch.full(shape[:3] + [width], -1, dtype=torch.int32, device=l.device))
        return cls(torch.cat(counts, dim), torch.cat(indices, dim), q_len=first.q_len, k_len=first.k_len,
                   block_q=first.block_q, block_k=first.block_k, causal=first.causal, window=first.window,
                   tile_mask_ids=torch.cat(ids, dim) if any_masks else None,
                   tile_masks=torch.cat(masks) if any_masks else None,
                   allow_empty_rows=any(l.allow_empty_rows for l in layouts))

    def _with_rule_in_masks(self) -> BlockLayout:
        """The same token mask with the analytic rules moved into explicit tile masks (causal=False, no window)."""
        if not self.causal and self.window is None:
            return self
        b, h, qb, kb = self.listed_tiles()
        masks = torch.empty(len(b), self.block_q, self.block_k, dtype=torch.bool, device=self.device)
        for at in range(0, len(b), _TILE_CHUNK):
            sl = slice(at, at + _TILE_CHUNK)
            masks[sl] = self.tile_token_masks(b[sl], h[sl], qb[sl], kb[sl])
        return BlockLayout.from_tile_masks((b, h, qb, kb), masks, q_len=self.q_len, k_len=self.k_len,
                                           block_q=self.block_q, block_k=self.block_k, batch=self.batch,
                                           heads=self.heads, allow_empty_rows=self.allow_empty_rows)


# ---------------------------------------------------------------------- helpers
def _block_lists(block_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Counts `[..., nQ]` and sorted, -1-padded indices `[..., nQ, maxK]` of a bool block matrix."""
    n_k = block_mask.shape[-1]
    counts = block_mask.sum(-1, dtype=torch.int32)
    max_k = max(int(counts.max()) if counts.numel() else 0, 1)
    ids = torch.arange(n_k, dtype=torch.int32, device=block_mask.device)
    keyed = torch.where(block_mask, ids, torch.full_like(ids, n_k))
    indices = keyed.sort(dim=-1).values[..., :max_k].contiguous()
    indices = torch.where(indices == n_k, torch.full_like(indices, -1), indices)
    return counts, indices


def _tile_bounds(q_block: Tensor, k_block: Tensor, q_len: int, k_len: int, block_q: int, block_k: int) -> Tensor:
    """bool `[T, block_q, block_k]`: which positions of tiles (q_block, k_block) lie inside the lengths."""
    rows = q_block.view(-1, 1, 1) * block_q + torch.arange(block_q, device=q_block.device).view(1, block_q, 1)
    cols = k_block.view(-1, 1, 1) * block_k + torch.arange(block_k, device=k_block.device).view(1, 1, block_k)
    return (rows < q_len) & (cols < k_len)


def _analytic_block_support(q_len, k_len, block_q, block_k, causal, window, device) -> Tensor:
    """bool `[nQ, nK]`: tiles in which the analytic constraints leave at least one pair."""
    n_q, n_k = _cdiv(q_len, block_q), _cdiv(k_len, block_k)
    q_first = torch.arange(n_q, device=device) * block_q + (k_len - q_len)
    q_last = (torch.arange(n_q, device=device) * block_q + block_q - 1).clamp(max=q_len - 1) + (k_len - q_len)
    k_first = torch.arange(n_k, device=device) * block_k
    k_last = (k_first + block_k - 1).clamp(max=k_len - 1)
    lo = torch.full((n_q,), -(1 << 62), device=device, dtype=torch.long)
    hi = torch.full((n_q,), 1 << 62, device=device, dtype=torch.long)
    # every row's allowed interval is [row - left, row + right] (causal: right = 0); the union over
    # a query block is contiguous because both ends increase with the row.
    if window is not None:
        lo = q_first - window[0]
        hi = q_last + window[1]
    if causal:
        hi = torch.minimum(hi, q_last)
    support = (k_first.view(1, -1) <= hi.view(-1, 1)) & (k_last.view(1, -1) >= lo.view(-1, 1))
    # rows with an empty interval (window right < 0 cannot happen; causal with offset < 0 can)
    return support & (hi >= 0).view(-1, 1) & (lo <= k_len - 1).view(-1, 1)


def _slot_of(kv_indices: Tensor, kv_counts: Tensor, b: Tensor, h: Tensor, q_block: Tensor, k_block: Tensor) -> Tensor:
    """Position of k_block in the block list of (b, h, q_block)."""
    bb = b if kv_indices.shape[0] > 1 else torch.zeros_like(b)
    hh = h if kv_indices.shape[1] > 1 else torch.zeros_like(h)
    lists = kv_indices[bb, hh, q_block]  # [T, maxK]
    return (lists == k_block.view(-1, 1)).int().argmax(dim=1)


def _unique_masks(masks: Tensor) -> tuple[Tensor, Tensor]:
    """(the distinct masks of `[M, bq, bk]`, each mask's index among them). Masks are compared as
    packed 64-bit words: sorting M x bq*bk/64 words instead of M x bq*bk bools."""
    flat = masks.reshape(len(masks), -1)
    if flat.shape[1] % 64:
        flat = torch.nn.functional.pad(flat, (0, 64 - flat.shape[1] % 64))
    shifts = torch.arange(8, dtype=torch.uint8, device=masks.device)
    words = (flat.view(len(flat), -1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8).view(torch.int64)
    unique, inverse = torch.unique(words, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(words), dtype=torch.long, device=masks.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(words), device=masks.device), "amin")
    return masks[first], inverse


def _layout_from_tile_masks(template: BlockLayout, tiles, masks: Tensor, *, allow_empty_rows: bool) -> BlockLayout:
    """A layout of `template`'s shape whose tiles carry `masks` ([T, bq, bk], True = allowed)."""
    return BlockLayout.from_tile_masks(tiles, masks, q_len=template.q_len, k_len=template.k_len,
                                       block_q=template.block_q, block_k=template.block_k, batch=template.batch,
                                       heads=template.heads, allow_empty_rows=allow_empty_rows)

"""Selection rules shared by block-selection methods: cumulative-threshold and top-k over block scores,
and mapping key heads to the query heads they serve (GQA); building layouts from per-query-block
key columns (stripes)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 dot-product units (AVX512-BF16 or AMX-BF16) and torch can use them
    (oneDNN): there bf16 GEMMs run several times faster than fp32 ones; elsewhere they are emulated."""
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16")) and torch.backends.mkldnn.is_available()


def expand_kv_heads(k: Tensor, heads_q: int) -> Tensor:
    """`[B, Hkv, L, D]` -> `[B, Hq, L, D]` view-expanded (no copy): each key head serves its query group."""
    batch, heads_kv, length, dim = k.shape
    if heads_q % heads_kv:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key heads ({heads_kv})")
    group = heads_q // heads_kv
    return k[:, :, None].expand(batch, heads_kv, group, length, dim).reshape(batch, heads_q, length, dim)


def cumulative_threshold(scores: Tensor, threshold: float, *, forced: Tensor | None = None) -> Tensor:
    """bool mask of the fewest blocks per row whose scores sum to >= `threshold` x the row total.

    scores: `[..., nK]` non-negative (blocks that may not be chosen must be 0); forced: bool `[..., nK]`
    blocks that are always kept (they are counted first). Ties are broken by block index.
    """
    if forced is not None:
        # forced blocks sort first; their mass counts toward the threshold
        keyed = torch.where(forced, torch.full_like(scores, float("inf")), scores)
    else:
        keyed = scores
    order = keyed.argsort(dim=-1, descending=True, stable=True)
    sorted_scores = scores.gather(-1, order)
    total = scores.sum(-1, keepdim=True)
    before = sorted_scores.cumsum(-1) - sorted_scores  # mass of the blocks ranked ahead of each block
    keep_sorted = (before < threshold * total) & (sorted_scores > 0)
    if forced is not None:
        keep_sorted = keep_sorted | forced.gather(-1, order)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


_ARGMAX_TOP_K = 4  # top_k by repeated arg-max up to this k


def top_k(scores: Tensor, k: int, *, allowed: Tensor, forced: Tensor | None = None) -> Tensor:
    """bool mask of the `k` highest-scoring allowed blocks per row (fewer where fewer are allowed);
    `forced` blocks are always kept and count toward `k`."""
    keyed = scores.masked_fill(~allowed, float("-inf"))
    if forced is not None:
        keyed = keyed.masked_fill_(forced, float("inf"))
    k = min(k, scores.shape[-1])
    if k > _ARGMAX_TOP_K:
        chosen = keyed.topk(k, dim=-1).indices
        return torch.zeros_like(allowed).scatter_(-1, chosen, True) & allowed
    # a few best per row: k arg-max passes beat torch.topk's per-row partial sort on many short rows
    # (MoBA: 3 of 32 blocks for every query token); the same set unless two scores tie exactly
    mask = torch.zeros_like(allowed)
    for _ in range(k):
        best = keyed.argmax(-1, keepdim=True)
        mask.scatter_(-1, best, True)
        keyed.scatter_(-1, best, float("-inf"))
    return mask & allowed


def pack_bits(bits: Tensor) -> Tensor:
    """int64 `[..., W]`: the last axis of a bool tensor packed 64 to a word (`W = ceil(n / 64)`), so a
    tile's row or column pattern compares, dedups and sorts as one integer."""
    n = bits.shape[-1]
    words = -(-n // 64)
    if words * 64 != n:
        bits = torch.nn.functional.pad(bits, (0, words * 64 - n))
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    packed = (bits.reshape(*bits.shape[:-1], words * 8, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)
    return packed.view(torch.int64)  # little-endian bytes: bit i of the axis is bit i of its word


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """bool `[..., n]`: the inverse of `pack_bits`."""
    # through the little-endian bytes: the intermediate is one byte per bit, not eight
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    data = words.contiguous().view(torch.uint8)                                    # [..., 8 W]
    return ((data.unsqueeze(-1) >> shifts) & 1).view(*words.shape[:-1], -1)[..., :n].bool()


def _unique_words(words: Tensor) -> tuple[Tensor, Tensor]:
    """Unique rows of an int64 `[T, W]` and each row's index among them."""
    if words.shape[1] == 1:
        unique, inverse = torch.unique(words[:, 0], return_inverse=True)
        return unique.unsqueeze(1), inverse
    return torch.unique(words, dim=0, return_inverse=True)


def stripe_layout(words: Tensor, *, axis: str, q_len: int, k_len: int, block_q: int, block_k: int,
                  causal: bool = True) -> "BlockLayout":
    """Layout whose every listed tile keeps a set of whole rows (`axis="rows"`) or whole columns
    (`axis="columns"`), given as packed bits (`pack_bits`) `[B, H, nQ, nK, W]`: the tile's rows (query
    positions in the tile) or columns (key positions). A tile is listed when a bit is set (and the
    causal rule leaves it a pair); it carries an explicit mask only when some in-range bit is clear, and
    identical masks are stored once. Built from block lists and packed words, O(tiles): no token mask.
    Every row is assumed to keep a key (the rules using it force the query's own block), so the
    constructor's per-row check over every tile mask is skipped."""
    device = words.device
    n_q, n_k = -(-q_len // block_q), -(-k_len // block_k)
    size, count, length = (block_q, n_q, q_len) if axis == "rows" else (block_k, n_k, k_len)
    in_range = (torch.arange(count, device=device).view(-1, 1) * size + torch.arange(size, device=device)) < length
    range_words = pack_bits(in_range)                                    # [count, W]
    range_words = range_words.view(count, 1, -1) if axis == "rows" else range_words.view(1, count, -1)
    listed = ((words & range_words) != 0).any(-1)
    full = ((words & range_words) == range_words).all(-1)
    def to_masks(unique):
        bits = unpack_bits(unique, size)
        return _row_masks(bits, block_k) if axis == "rows" else _column_masks(bits, block_q)

    return _packed_layout(listed, full, words, to_masks, q_len=q_len, k_len=k_len, block_q=block_q,
                          block_k=block_k, causal=causal, allow_empty_rows=True)


_BYTES_SET = 0x0101010101010101  # eight True bytes as one int64


def _row_masks(rows: Tensor, block_k: int) -> Tensor:
    """bool `[U, bq, block_k]` whose row i is all True where `rows[u, i]`: written contiguously, eight
    bytes (mask entries) per int64 store where block_k allows, not through an expanded view."""
    count, block_q = rows.shape
    if block_k % 8:
        return rows.unsqueeze(-1).expand(count, block_q, block_k).contiguous()
    words = rows.to(torch.int64) * _BYTES_SET
    return words.unsqueeze(-1).expand(count, block_q, block_k // 8).contiguous().view(torch.bool) \
        .view(count, block_q, block_k)


def _column_masks(columns: Tensor, block_q: int) -> Tensor:
    """bool `[U, block_q, bk]` whose every row is `columns[u]`, written contiguously (int64 stores
    where bk allows)."""
    count, block_k = columns.shape
    if block_k % 8:
        return columns.unsqueeze(1).expand(count, block_q, block_k).contiguous()
    words = columns.contiguous().view(torch.int64)                      # [U, bk / 8]
    return words.unsqueeze(1).expand(count, block_q, block_k // 8).contiguous().view(torch.bool) \
        .view(count, block_q, block_k)


def column_layout(columns: Tensor, *, q_len: int, block_q: int, block_k: int, causal: bool = True) -> "BlockLayout":
    """Layout in which each query block attends to an arbitrary set of key tokens (stripes).

    columns: bool `[B, H, nQ, Lk]`, the key positions each query block keeps. A key tile is listed
    where it holds a kept column; unless all its columns are kept it carries an explicit tile mask
    (the kept columns, the same for every row), and causality is applied on top as usual.
    """
    batch, heads, n_q, k_len = columns.shape
    n_k = -(-k_len // block_k)
    cols = torch.nn.functional.pad(columns, (0, n_k * block_k - k_len)).view(batch, heads, n_q, n_k, block_k)
    return stripe_layout(pack_bits(cols), axis="columns", q_len=q_len, k_len=k_len, block_q=block_q,
                         block_k=block_k, causal=causal)


def row_gate_layout(gates: Tensor, *, group: int, k_len: int, tile: int, causal: bool = True) -> "BlockLayout":
    """Layout of per-token gates over key groups: query token i attends to every key of group g when
    `gates[b, h, i, g]` (MoBA's blocks, LongHeads' chunks), causally. gates: bool `[B, H, Lq, nG]`,
    groups of `group` keys (a multiple of `tile`), tiles `tile x tile`. Each listed tile keeps the rows
    whose token chose its group, packed per (query tile, group) and shared by the group's tiles."""
    batch, heads, q_len, n_groups = gates.shape
    if group % tile:
        raise ValueError(f"group ({group}) must be a multiple of tile ({tile})")
    n_q, n_k = -(-q_len // tile), -(-k_len // tile)
    rows = torch.nn.functional.pad(gates, (0, 0, 0, n_q * tile - q_len)).view(batch, heads, n_q, tile, n_groups)
    words = pack_bits(rows.transpose(-1, -2))                           # [B, H, nQ, nG, W]
    group_of_tile = torch.arange(n_k, device=gates.device) // (group // tile)
    words = words.index_select(3, group_of_tile)                        # [B, H, nQ, nK, W]
    return stripe_layout(words, axis="rows", q_len=q_len, k_len=k_len, block_q=tile, block_k=tile, causal=causal)


def row_words_layout(words: Tensor, *, q_len: int, k_len: int, block_q: int, block_k: int, causal: bool,
                     allow_empty_rows: bool = True) -> "BlockLayout":
    """Layout of an arbitrary token mask given row by row as packed key bits: `words` int64
    `[B, H, Lq, nK, W]` holds, for query token i and key tile t, the tile's kept keys
    (`pack_bits` of its `block_k` columns). A tile is listed when one of its rows keeps a key (and the
    causal rule leaves it a pair); it carries one explicit mask unless every in-range row keeps every
    in-range key. O(Lq x nK) words: no `[Lq, Lk]` tensor."""
    device = words.device
    batch, heads, _, n_k, width = words.shape
    n_q = -(-q_len // block_q)
    words = torch.nn.functional.pad(words, (0, 0, 0, 0, 0, n_q * block_q - q_len))
    tiles = words.view(batch, heads, n_q, block_q, n_k, width).transpose(3, 4)    # [B, H, nQ, nK, bq, W]
    in_keys = (torch.arange(n_k, device=device).view(-1, 1) * block_k + torch.arange(block_k, device=device)) < k_len
    key_words = pack_bits(in_keys).view(1, 1, 1, n_k, 1, width)
    in_rows = (torch.arange(n_q * block_q, device=device) < q_len).view(1, 1, n_q, 1, block_q)
    listed = ((tiles & key_words) != 0).any(-1).any(-1)
    full = (((tiles & key_words) == key_words).all(-1) | ~in_rows).all(-1)
    return _packed_layout(listed, full, tiles, lambda unique: unpack_bits(unique, block_k), q_len=q_len,
                          k_len=k_len, block_q=block_q, block_k=block_k, causal=causal,
                          allow_empty_rows=allow_empty_rows)


def _packed_layout(listed: Tensor, full: Tensor, tile_words: Tensor, to_masks, *, q_len: int, k_len: int,
                   block_q: int, block_k: int, causal: bool, allow_empty_rows: bool) -> "BlockLayout":
    """Layout of the `listed` tiles (bool `[B, H, nQ, nK]`), `full` ones whole, the others masked by
    their packed bits `tile_words [B, H, nQ, nK, ...]` (int64); `to_masks(words [U, ...])` unpacks
    distinct words into bool `[U, block_q, block_k]`. Masks are deduplicated on the packed words, and a
    partial tile's bits are neither all clear nor all set in range, so the layout trusts them."""
    from blockattn.layout import BlockLayout, _analytic_block_support
    if causal:
        listed = listed & _analytic_block_support(q_len, k_len, block_q, block_k, True, None, listed.device)
    partial = listed & ~full
    tiles = partial.nonzero(as_tuple=True)
    words = tile_words[tiles]
    masks = inverse = None
    if len(words):
        unique, inverse = _unique_words(words.reshape(len(words), -1))
        masks = to_masks(unique.view(-1, *words.shape[1:]))
    return BlockLayout.from_tile_masks(tiles, masks, mask_ids=inverse, full=listed & full, q_len=q_len, k_len=k_len,
                                       block_q=block_q, block_k=block_k, causal=causal,
                                       allow_empty_rows=allow_empty_rows, trusted=True)

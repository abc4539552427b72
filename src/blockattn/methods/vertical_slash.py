"""MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention
(Jiang et al., 2024), its "vertical-slash" head pattern estimated online.

Rule: the last `last_q` queries attend (causally, softmax over all keys) to every key. Summing
their probabilities per key column gives vertical scores, and per diagonal (offset = query - key)
gives slash scores. The first 30 key columns and the 100 nearest diagonals are forced (ranked first;
nearest first among the diagonals, where the official code leaves that order to `topk`), then the top `vertical_size` columns and top `slash_size` diagonals are kept. Each query block of
`block_size` rows then computes the kept columns plus the keys the official index conversion
(`convert_vertical_slash_indexes`, csrc/vertical_slash_index.cu) gives it for the kept diagonals:
walking them from the farthest, each diagonal is the `block_size` keys it crosses in the block, and a
range grows by whole `block_size` steps while the next diagonal ends within one step of it (a
superset of the exact crossings: the kernel computes whole key blocks). These per-block key sets
(stripes) are expressed with explicit column tile masks, causal on top.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_vertical_slash.py. Side by side with the official estimate (`Minference_prefill`
as shipped in mit-han-lab/x-attention, run on CPU outside the repo with its sparse kernel stubbed
to record its inputs; head dim 128, random inputs, L = 1024/2048/1500, sizes 100/300, 200/1000,
1000/6096): the same columns and diagonals for every head. The official code scales the estimate
by 1/sqrt(128) whatever the head dim; this class uses the attention's 1/sqrt(D). Its index
conversion (a CUDA kernel) was not run; tests/methods/test_vertical_slash.py compares `slash_ranges`
with a line-by-line Python transcription of it on dense, clustered and isolated diagonal sets.

Per-head patterns (`config=`): MInference's offline search (`blockattn.methods.calibration`) gives
every head of every layer one of three patterns and its budget: vertical-slash with its own sizes,
A-shape ("stream_llm": the first `n_init` keys plus the `n_local` nearest diagonals, put through the
same index conversion; the official Triton streaming kernel keeps that window exactly, so the layout is
a superset by less than one 64-key range per row), or block-sparse (each query block keeps its `top_k`
key blocks by mean-pooled queries . mean-pooled keys, causal blocks only, as `_build_block_index` in
minference/ops/block_sparse_flash_attention.py). `select(..., layer=i)` applies layer i's heads.

Causality: the estimate uses the prompt's last `last_q` queries, so in prefill any token can
change the columns and diagonals every earlier query keeps (never letting it see a later key), as
in MInference; logits before a position therefore depend on the whole prompt unless the sizes keep
everything (the defaults do below 6096 tokens).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn._checks import check_qk
from blockattn.methods._select import column_layout, pack_bits, stripe_layout
from blockattn.methods.base import PrefillMethod

_FORCED_COLUMNS = 30    # the official kernel always keeps the first 30 keys (attention sinks)
_FORCED_DIAGONALS = 100  # ... and the 100 nearest diagonals (local window)
PATTERNS = ("vertical_and_slash", "stream_llm", "block_sparse")  # MInference's names for its three head patterns


@register("vertical_slash")
@dataclasses.dataclass
class VerticalSlash(PrefillMethod):
    """Args:
        vertical_size: key columns kept per head (MInference default 1000).
        slash_size: diagonals kept per head (MInference default 6096).
        last_q: queries used for the estimate (paper: 64).
        block_size: query and key tile size of the layout (official kernel: 64).
        config: path of a per-layer/per-head pattern config (JSON written by `blockattn calibrate
            vertical_slash`, or an official MInference `*_best_pattern.json`); `select` then needs `layer=`
            and each head runs its own pattern and sizes (`vertical_size`/`slash_size` are unused).
    """

    within_block_lookahead = True  # the prompt's last queries choose every row's columns and diagonals
    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    block_size: int = 64
    config: str | None = None

    def __post_init__(self):
        self.check_positive_ints("vertical_size", "slash_size", "last_q", "block_size")
        self._patterns = None
        if self.config is not None:
            from blockattn.methods.calibration import load_patterns
            if self.block_size > 64:
                raise ValueError(f"config= needs block_size <= 64 (the official kernels' 64-token blocks), "
                                 f"got block_size={self.block_size}")
            self._patterns = load_patterns(self.config)

    def lines(self, q: Tensor, k: Tensor, sizes: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """bool `[B, Hq, L]` kept key columns and bool `[B, Hq, L]` kept diagonal offsets; `sizes`: per-head
        (vertical, slash) sizes, int `[Hq]` each, instead of the fields."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"vertical_slash estimates prefill attention: q_len ({length}) must equal "
                             f"k_len ({k.shape[2]})")
        last = min(self.last_q, length)
        heads_kv = k.shape[1]
        # the query heads of a key head stacked row-wise: one GEMM per key head, no key copies
        rows_q = (q[:, :, -last:].float() * dim ** -0.5).reshape(batch, heads_kv, heads // heads_kv * last, dim)
        logits = (rows_q @ k.float().transpose(-1, -2)).view(batch, heads, last, length)  # [B, H, last, L]
        rows = torch.arange(length - last, length, device=q.device).view(-1, 1)
        future = torch.arange(length, device=q.device).view(1, -1) > rows
        probs = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        vertical = probs.sum(-2)
        vertical[..., :_FORCED_COLUMNS] = float("inf")
        offsets = (rows - torch.arange(length, device=q.device).view(1, -1)).clamp(min=0).expand(batch, heads, -1, -1)
        slash = torch.zeros(batch, heads, length, device=q.device).scatter_add_(-1, offsets.reshape(batch, heads, -1),
                                                              probs.masked_fill(future, 0).reshape(batch, heads, -1))
        # forced diagonals rank nearest first, so a slash_size below 100 keeps the nearest ones
        forced = min(_FORCED_DIAGONALS, length)
        # (a diagonal's real score is at most `last`, the number of rows summed)
        slash[..., :forced] = last + 1 + forced - torch.arange(forced, dtype=slash.dtype, device=q.device)
        if sizes is None:
            return (keep_top(vertical, min(length, max(self.vertical_size, _FORCED_COLUMNS))),
                    keep_top(slash, min(length, max(self.slash_size, 50))))
        v_size = sizes[0].to(q.device).clamp(min=_FORCED_COLUMNS).clamp(max=length)
        s_size = sizes[1].to(q.device).clamp(min=50).clamp(max=length)
        return keep_top(vertical, v_size), keep_top(slash, s_size)

    def layer_patterns(self, layer: int | None, heads: int) -> list[tuple]:
        """The `config`'s `(pattern, size, size)` for each of this layer's `heads` query heads."""
        if self._patterns is None:
            raise ValueError("vertical_slash has no config=; per-layer patterns come from a config file")
        if layer is None:
            raise ValueError(f"vertical_slash with config={self.config!r} needs select(..., layer=i): its heads' "
                             "patterns are per layer")
        if layer >= len(self._patterns):
            raise ValueError(f"layer {layer} is past the {len(self._patterns)} layers of config={self.config!r}")
        entries = self._patterns[layer]
        if len(entries) != heads:
            raise ValueError(f"config={self.config!r} has {len(entries)} heads in layer {layer} but q has {heads} "
                             "query heads")
        return entries

    def pattern_layout(self, q: Tensor, k: Tensor, patterns: list[tuple]) -> BlockLayout:
        """Layout in which query head h runs `patterns[h]`: `("vertical_and_slash", vertical_size,
        slash_size)`, `("stream_llm", n_init, n_local)` or `("block_sparse", top_k, 0)`."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if len(patterns) != heads:
            raise ValueError(f"patterns has {len(patterns)} entries but q has {heads} query heads")
        device, block = q.device, self.block_size
        kind = torch.tensor([PATTERNS.index(p[0]) for p in patterns], device=device)
        first = torch.tensor([int(p[1]) for p in patterns], device=device)
        second = torch.tensor([int(p[2]) for p in patterns], device=device)
        estimated = kind == 0
        positions = torch.arange(length, device=device)
        if bool(estimated.any()):
            columns, diagonals = self.lines(q, k, (torch.where(estimated, first, 0), torch.where(estimated, second, 0)))
        else:
            columns = diagonals = torch.zeros(batch, heads, length, dtype=torch.bool, device=device)
        # A-shape: the first n_init keys and the n_local nearest diagonals, fixed; block heads take their
        # words below (diagonal 0 only here, so every head keeps offset 0 for the range conversion)
        static = (kind != 0).view(1, -1, 1)
        columns = torch.where(static, positions < torch.where(kind == 1, first, 0).view(1, -1, 1), columns)
        diagonals = torch.where(static, positions < torch.where(kind == 1, second, 1).view(1, -1, 1), diagonals)
        n_k = -(-length // block)
        column_words = pack_bits(torch.nn.functional.pad(columns, (0, n_k * block - length))
                                 .view(batch, heads, n_k, block))[..., 0]
        words = slash_ranges(diagonals, block, packed=True) | column_words.unsqueeze(2)
        if bool((kind == 2).any()):
            chosen = self.pooled_blocks(q, k, first.clamp(min=1).clamp(max=n_k))
            words = torch.where((kind == 2).view(1, -1, 1, 1),
                                torch.where(chosen, _low_bits(torch.tensor(block, device=device)), 0), words)
        return stripe_layout(words.unsqueeze(-1), axis="columns", q_len=length, k_len=length, block_q=block,
                             block_k=block, causal=True)

    def pooled_blocks(self, q: Tensor, k: Tensor, top_k: Tensor) -> Tensor:
        """bool `[B, Hq, nQ, nK]`: MInference's block-sparse pattern, each query block's top `top_k[h]`
        causal key blocks by mean-pooled query . mean-pooled key (`_build_block_index`; the official
        mean counts the last block's zero padding, this one its real tokens)."""
        batch, heads, length, dim = q.shape
        heads_kv, block = k.shape[1], self.block_size
        n = -(-length // block)
        count = (torch.arange(n, device=q.device) * block).sub(length).neg().clamp(max=block).view(-1, 1)

        def pooled(x):
            x = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - length))
            return x.view(*x.shape[:2], n, block, dim).sum(3) / count

        q_pool = pooled(q).reshape(batch, heads_kv, heads // heads_kv * n, dim)
        logits = (q_pool @ pooled(k).transpose(-1, -2)).view(batch, heads, n, n)
        future = torch.arange(n, device=q.device).view(1, -1) > torch.arange(n, device=q.device).view(-1, 1)
        return keep_top(logits.masked_fill(future, float("-inf")), top_k) & ~future

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        if self._patterns is not None:
            return self.pattern_layout(q, k, self.layer_patterns(layer, q.shape[1]))
        columns, diagonals = self.lines(q, k)
        block, length = self.block_size, q.shape[2]
        if block > 64:
            kept = slash_ranges(diagonals, block) | columns[:, :, None]
            return column_layout(kept, q_len=length, block_q=block, block_k=block, causal=True)
        # one word of kept keys per (query block, key tile): the diagonals' ranges, the columns on top
        n_k = -(-length // block)
        column_words = pack_bits(torch.nn.functional.pad(columns, (0, n_k * block - length))
                                 .view(*columns.shape[:2], n_k, block))[..., 0]       # [B, H, nK]
        words = slash_ranges(diagonals, block, packed=True) | column_words.unsqueeze(2)
        return stripe_layout(words.unsqueeze(-1), axis="columns", q_len=length, k_len=length, block_q=block,
                             block_k=block, causal=True)


def keep_top(scores: Tensor, sizes: Tensor | int) -> Tensor:
    """bool mask of the top `sizes[h]` entries of each head's rows of `scores [B, H, ..., N]` (`sizes` int `[H]`,
    or one int for every head)."""
    if isinstance(sizes, int):
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(
            -1, scores.topk(sizes, dim=-1).indices, True)
    most = int(sizes.max())
    top = scores.topk(most, dim=-1).indices  # sorted: a head's first sizes[h] are its top sizes[h]
    rank_ok = torch.arange(most, device=scores.device) < sizes.view(-1, *([1] * (scores.dim() - 2)))
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(
        -1, top, rank_ok.expand_as(top))


def _ceil_div(x: Tensor, d: int) -> Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def slash_ranges(diagonals: Tensor, block: int, *, packed: bool = False) -> Tensor:
    """bool `[B, H, nQ, L]`: the keys MInference's index conversion (`convert_vertical_slash_indexes`,
    csrc/vertical_slash_index.cu) gives each query block of `block` rows for the kept diagonals
    (`diagonals` bool `[B, H, L]` by offset = query - key; causality is applied later).

    The kernel walks the diagonals from the farthest, each one the `block` keys it crosses in the
    block's last row span, `[end - o - block, end - o)` with `end` the block's end (clamped at 0). A
    range grows by whole `block` steps while the next diagonal's end lies within one step of it, and
    starts anew past that. Within a run anchored at diagonal a, diagonal j continues it iff
    ceil((o_a - o_j) / block) grows by at most one from the previous diagonal's, which depends on the
    anchor only through o_a mod block: so every run's end (`next break`) is found for all anchors at
    once, per residue, and each block follows its chain of runs (at most L / block + 1 of them).

    `packed` (block <= 64): the same keys as int64 words `[B, H, nQ, nK]`, one per key tile of
    `block` keys (`pack_bits` order), built per tile without the `[B, H, nQ, L]` array.
    """
    batch, heads, length = diagonals.shape
    device = diagonals.device
    n_q = -(-length // block)
    count = int(diagonals.sum(-1).max())
    # kept offsets, farthest first
    # rows keeping fewer (per-head sizes) end in copies of offset 0, which every row keeps: no extra keys
    offsets = torch.where(diagonals, torch.arange(length, device=device), 0).sort(-1, descending=True).values
    offsets = offsets[..., :count]                                                  # [B, H, n]
    n = count
    # Diagonal j breaks a run anchored at residue p (= o_anchor mod block) iff
    # floor((o_{j-1} - p) / block) - floor((o_j - p) / block) >= 2: always for a gap >= 2 block, never
    # for a gap < block, and in between iff (o_{j-1} - p) mod block < gap - block. Gaps of at least one
    # block are at most L / block per row, so the residue-dependent part is a small table.
    gaps = offsets[..., :-1] - offsets[..., 1:]                                     # gap before element j = 1..n-1
    index = torch.arange(1, n, device=device).expand_as(gaps)
    definite = torch.where(gaps >= 2 * block, index, n)
    next_definite = definite.flip(-1).cummin(-1).values.flip(-1)                    # first definite break >= j
    full_n = torch.full((batch, heads, 1), n, dtype=torch.long, device=device)
    next_definite = torch.cat([next_definite[..., :1], next_definite, full_n], -1) if n > 1 else \
        torch.cat([full_n, full_n], -1)                                             # [B, H, n + 1], by j
    ambiguous = torch.where((gaps >= block) & (gaps < 2 * block), index, n)
    width = max(1, int((ambiguous < n).sum(-1).max()) if n > 1 else 1)
    amb_pos = torch.cat([ambiguous, full_n.expand(-1, -1, width)], -1).sort(-1).values[..., :width].contiguous()
    before = offsets.gather(-1, (amb_pos - 1).clamp(0, n - 1))                      # o_{j-1}
    amb_gap = before - offsets.gather(-1, amb_pos.clamp(max=n - 1))
    phase = torch.arange(block, device=device)
    breaks = ((before.unsqueeze(-1) - phase) % block < (amb_gap - block).unsqueeze(-1)) & (amb_pos < n).unsqueeze(-1)
    next_amb = torch.where(breaks, amb_pos.unsqueeze(-1), n).flip(2).cummin(2).values.flip(2)  # [B, H, A, block]
    next_amb = torch.cat([next_amb, torch.full_like(next_amb[:, :, :1], n)], 2).view(batch, heads, -1)

    def first_break(residue: Tensor, j: Tensor) -> Tensor:
        """The first diagonal at or after j that breaks a run anchored at this residue (n: none)."""
        slot = torch.searchsorted(amb_pos, j.contiguous())
        return torch.minimum(next_definite.gather(-1, j), next_amb.gather(-1, slot * block + residue))

    residues = offsets % block
    anchor_break = first_break(residues, torch.arange(1, n + 1, device=device).expand(batch, heads, n))
    padded = torch.cat([offsets, offsets[..., -1:]], -1)
    last = padded.gather(-1, anchor_break - 1)                                      # the run's last diagonal
    anchor_steps = _ceil_div(offsets - last, block)                                 # whole steps it grew

    ends = (torch.arange(n_q, device=device) + 1) * block                           # [nQ]
    ascending = (-offsets).contiguous()  # count of offsets >= x = searchsorted(-offsets, -x, right)

    def at_least(x: Tensor) -> Tensor:
        return torch.searchsorted(ascending, (-x).expand(batch, heads, -1).contiguous(), right=True)

    first = at_least(ends)                                                          # [B, H, nQ] first valid
    o_first = padded.gather(-1, first.clamp(max=n))
    clamped = o_first >= (ends - block)  # its range would start before key 0: the kernel clamps it to [0, block)
    # clamped: a virtual anchor at offset end - block (residue 0), continued by the offsets below it
    virtual = ends - block
    below = at_least(virtual)                                                       # first offset < end - block
    v_break = first_break(torch.zeros_like(below), below.clamp(max=n))
    v_last = padded.gather(-1, (v_break - 1).clamp(min=0))
    v_steps = torch.where(v_break > below, _ceil_div(virtual - v_last, block), 0)
    anchor = torch.where(clamped, virtual.expand_as(first), o_first)
    steps = torch.where(clamped, v_steps, anchor_steps.gather(-1, first.clamp(max=n - 1)))
    frontier = torch.where(clamped, v_break, anchor_break.gather(-1, first.clamp(max=n - 1)))

    # interval starts and ends counted in float32 (exact for these counts; torch's CPU cumsum is
    # several times faster on float32 than on int32). Packed: whole tiles counted per tile, the
    # partial ones' bits added (a block's runs are disjoint, so adding bits is OR-ing them).
    n_k = -(-length // block)
    if packed:
        tile_diff = torch.zeros(batch, heads, n_q, n_k + 1, device=device)
        partial = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.int64, device=device)
    else:
        diff = torch.zeros(batch, heads, n_q, length + 1, device=device)
    active = torch.ones_like(first, dtype=torch.bool)
    while True:
        lo = (ends - anchor - block).clamp(0, length)
        hi = (ends - anchor + block * steps).clamp(0, length)
        live = active & (hi > lo)
        if packed:
            _add_packed(tile_diff, partial, lo, hi, live, block, n_k)
        else:
            diff.scatter_add_(-1, lo.unsqueeze(-1), live.float().unsqueeze(-1))
            diff.scatter_add_(-1, hi.unsqueeze(-1), -live.float().unsqueeze(-1))
        active = frontier < n
        if not bool(active.any()):
            break
        at = frontier.clamp(max=n - 1)
        anchor = offsets.gather(-1, at)
        steps = anchor_steps.gather(-1, at)
        frontier = torch.where(active, anchor_break.gather(-1, at), n)
    if packed:
        whole = tile_diff.cumsum(-1)[..., :n_k] > 0.5
        return torch.where(whole, _low_bits(torch.tensor(block, device=device)), partial[..., :n_k])
    return diff.cumsum(-1)[..., :length] > 0.5


def _low_bits(count: Tensor) -> Tensor:
    """int64 words with the lowest `count` (0..64) bits set."""
    one = torch.ones((), dtype=torch.int64, device=count.device)
    return torch.where(count >= 64, -one, (one << count.clamp(max=63)) - 1)


def _add_packed(tile_diff: Tensor, partial: Tensor, lo: Tensor, hi: Tensor, live: Tensor, block: int, n_k: int):
    """Add the key intervals [lo, hi) (where `live`) to per-tile counts of whole tiles and to the words
    of the tiles they cover in part (slot n_k takes what does not apply)."""
    first_whole = -(-lo // block)
    stop_whole = hi // block
    whole = live & (stop_whole > first_whole)
    tile_diff.scatter_add_(-1, torch.where(whole, first_whole, n_k).unsqueeze(-1), whole.float().unsqueeze(-1))
    tile_diff.scatter_add_(-1, torch.where(whole, stop_whole, n_k).unsqueeze(-1), -whole.float().unsqueeze(-1))
    head_tile, tail_tile = lo // block, (hi - 1) // block
    head = live & (lo % block != 0)
    head_bits = _low_bits(torch.minimum(hi - head_tile * block, torch.full_like(hi, block))) ^ _low_bits(lo % block)
    partial.scatter_add_(-1, torch.where(head, head_tile, n_k).unsqueeze(-1),
                         torch.where(head, head_bits, 0).unsqueeze(-1))
    tail = live & (hi % block != 0) & ((tail_tile > head_tile) | (lo % block == 0))
    partial.scatter_add_(-1, torch.where(tail, tail_tile, n_k).unsqueeze(-1),
                         torch.where(tail, _low_bits(hi % block), 0).unsqueeze(-1))

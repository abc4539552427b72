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
from blockattn.methods._select import column_layout, expand_kv_heads
from blockattn.methods.base import PrefillMethod

_FORCED_COLUMNS = 30    # the official kernel always keeps the first 30 keys (attention sinks)
_FORCED_DIAGONALS = 100  # ... and the 100 nearest diagonals (local window)


@register("vertical_slash")
@dataclasses.dataclass
class VerticalSlash(PrefillMethod):
    """Args:
        vertical_size: key columns kept per head (MInference default 1000).
        slash_size: diagonals kept per head (MInference default 6096).
        last_q: queries used for the estimate (paper: 64).
        block_size: query and key tile size of the layout (official kernel: 64).
    """

    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64
    block_size: int = 64


    def __post_init__(self):
        self.check_positive_ints("vertical_size", "slash_size", "last_q", "block_size")

    def lines(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """bool `[B, Hq, L]` kept key columns and bool `[B, Hq, L]` kept diagonal offsets."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"vertical_slash estimates prefill attention: q_len ({length}) must equal "
                             f"k_len ({k.shape[2]})")
        last = min(self.last_q, length)
        keys = expand_kv_heads(k.float(), heads)
        logits = q[:, :, -last:].float() @ keys.transpose(-1, -2) / dim ** 0.5  # [B, H, last, L]
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
        v_size = min(length, max(self.vertical_size, _FORCED_COLUMNS))
        s_size = min(length, max(self.slash_size, 50))
        columns = torch.zeros(batch, heads, length, dtype=torch.bool, device=q.device)
        columns.scatter_(-1, vertical.topk(v_size, dim=-1).indices, True)
        diagonals = torch.zeros(batch, heads, length, dtype=torch.bool, device=q.device)
        diagonals.scatter_(-1, slash.topk(s_size, dim=-1).indices, True)
        return columns, diagonals

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        columns, diagonals = self.lines(q, k)
        kept = slash_ranges(diagonals, self.block_size) | columns[:, :, None]
        return column_layout(kept, q_len=q.shape[2], block_q=self.block_size, block_k=self.block_size, causal=True)


def _ceil_div(x: Tensor, d: int) -> Tensor:
    return -torch.div(-x, d, rounding_mode="floor")


def slash_ranges(diagonals: Tensor, block: int) -> Tensor:
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
    """
    batch, heads, length = diagonals.shape
    device = diagonals.device
    n_q = -(-length // block)
    count = int(diagonals.sum(-1).max())
    # kept offsets, farthest first (every row keeps the same number: the top `slash_size`)
    offsets = torch.where(diagonals, torch.arange(length, device=device), -1).sort(-1, descending=True).values
    offsets = offsets[..., :count]                                                  # [B, H, n]
    n = count
    phase = torch.arange(block, device=device).view(1, 1, -1, 1)
    units = _ceil_div(phase - offsets.unsqueeze(2), block)                          # [B, H, block, n]
    jump = torch.zeros_like(units, dtype=torch.bool)
    jump[..., 1:] = (units[..., 1:] - units[..., :-1]) >= 2
    position = torch.arange(n, device=device).expand_as(units)
    first_jump = torch.where(jump, position, n).flip(-1).cummin(-1).values.flip(-1)  # first break at or after j
    first_jump = torch.cat([first_jump, torch.full_like(first_jump[..., :1], n)], -1)  # [B, H, block, n + 1]

    residues = offsets % block
    # per anchor element i: the first break after it (looked up at i + 1 in its residue's row)
    after = first_jump.permute(0, 1, 3, 2)[:, :, 1:]                               # [B, H, n, block]
    anchor_break = after.gather(3, residues.unsqueeze(-1)).squeeze(-1)              # [B, H, n]
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
    v_break = first_jump[:, :, 0].gather(-1, below.clamp(max=n))
    v_last = padded.gather(-1, (v_break - 1).clamp(min=0))
    v_steps = torch.where(v_break > below, _ceil_div(virtual - v_last, block), 0)
    anchor = torch.where(clamped, virtual.expand_as(first), o_first)
    steps = torch.where(clamped, v_steps, anchor_steps.gather(-1, first.clamp(max=n - 1)))
    frontier = torch.where(clamped, v_break, anchor_break.gather(-1, first.clamp(max=n - 1)))

    # interval starts and ends counted in float32 (exact for these counts; torch's CPU cumsum is
    # several times faster on float32 than on int32)
    diff = torch.zeros(batch, heads, n_q, length + 1, device=device)
    active = torch.ones_like(first, dtype=torch.bool)
    while True:
        lo = (ends - anchor - block).clamp(0, length)
        hi = (ends - anchor + block * steps).clamp(0, length)
        live = active & (hi > lo)
        diff.scatter_add_(-1, lo.unsqueeze(-1), live.float().unsqueeze(-1))
        diff.scatter_add_(-1, hi.unsqueeze(-1), -live.float().unsqueeze(-1))
        active = frontier < n
        if not bool(active.any()):
            break
        at = frontier.clamp(max=n - 1)
        anchor = offsets.gather(-1, at)
        steps = anchor_steps.gather(-1, at)
        frontier = torch.where(active, anchor_break.gather(-1, at), n)
    return diff.cumsum(-1)[..., :length] > 0.5

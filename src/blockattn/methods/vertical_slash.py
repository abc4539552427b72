"""MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention
(Jiang et al., 2024), its "vertical-slash" head pattern estimated online.

Rule: the last `last_q` queries attend (causally, softmax over all keys) to every key. Summing
their probabilities per key column gives vertical scores, and per diagonal (offset = query - key)
gives slash scores. The first 30 key columns and the 100 nearest diagonals are forced (ranked first;
nearest first among the diagonals, where the official code leaves that order to `topk`), then the top `vertical_size` columns and top `slash_size` diagonals are kept. As in the official
kernel's index conversion, each query block of `block_size` rows then computes the kept columns
plus, for every kept diagonal, the `block_size` keys that diagonal crosses inside the block; this
per-block key set (stripes) is expressed with explicit column tile masks, causal on top.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_vertical_slash.py. Side by side with the official estimate (`Minference_prefill`
as shipped in mit-han-lab/x-attention, run on CPU outside the repo with its sparse kernel stubbed
to record its inputs; head dim 128, random inputs, L = 1024/2048/1500, sizes 100/300, 200/1000,
1000/6096): the same columns and diagonals for every head. The official code scales the estimate
by 1/sqrt(128) whatever the head dim; this class uses the attention's 1/sqrt(D). Its index
conversion (a CUDA kernel) was not run.

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
from blockattn.methods.base import Method

_FORCED_COLUMNS = 30    # the official kernel always keeps the first 30 keys (attention sinks)
_FORCED_DIAGONALS = 100  # ... and the 100 nearest diagonals (local window)


@register("vertical_slash")
@dataclasses.dataclass
class VerticalSlash(Method):
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

    causal_modes = (True,)
    any_lengths = False

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
        batch, heads, length = columns.shape
        block = self.block_size
        n_q = -(-length // block)
        # a diagonal o crosses query block [s, s+block) at keys [s-o, s+block-1-o]: key j is covered
        # when some kept o lies in [s-j, s+block-1-j]; count kept offsets with a prefix sum
        prefix = torch.nn.functional.pad(diagonals.int().cumsum(-1), (1, 0))  # prefix[o] = kept offsets < o
        starts = torch.arange(n_q, device=q.device).view(-1, 1) * block
        j = torch.arange(length, device=q.device).view(1, -1)
        lo = (starts - j).clamp(0, length)
        hi = (starts + block - j).clamp(0, length)
        count = prefix.gather(-1, hi.reshape(1, 1, -1).expand(batch, heads, -1)) - \
            prefix.gather(-1, lo.reshape(1, 1, -1).expand(batch, heads, -1))
        kept = (count.view(batch, heads, n_q, length) > 0) | columns[:, :, None]
        return column_layout(kept, q_len=length, block_q=block, block_k=block, causal=True)

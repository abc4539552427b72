"""LongHeads: Multi-Head Attention is Secretly a Long Context Processor (Lu et al., 2024).

Rule: the context is cut into chunks of `window_size` tokens and every head lets each query attend
to `atten_length / window_size` chunks (so each head works within a length it was trained on).
A chunk is summarised by a key: attention inside the chunk (non-causal) gives one output per token,
their mean `m` pools the chunk's keys, `key_c = softmax(m K_c^T / sqrt(d)) K_c`. A query token at
position >= `begin_selective_length` scores the chunks up to its own by `q . key_c` and keeps the
first chunk, the previous and the current chunk, and the best of the rest up to the budget;
earlier tokens attend causally to everything. Selection is per head and per query token; the layout
keeps the exact token mask (causal).

Read from the official code (LuLuLuyi/LongHeads, modeling_longheads/modeling_llama.py): defaults
window_size=256, atten_length=4096, begin_selective_length=4096, the chunk key above and the forced
first/previous/current chunks. Differences: the official code uses the values inside the chunk
attention, chunk-local RoPE (positions mod window_size) for the chunk keys and pre-RoPE queries for
scoring; `select(q, k)` sees one q/k only, so it uses `v` when passed (`select(q, k, v=v)`) and the
keys otherwise. A last partial chunk: the official code zero-pads it and the padding keys take part
in the chunk's softmax; here they are left out. In its prefill path a selective query attends to
the tokens before it in its own chunk but not to itself (`cache_seqlens` = whole chunks + offset in
the chunk; its decoding path does include the current token); here the mask is causal with the
diagonal, like the tokens before `begin_selective_length`.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_longheads.py. Side by side with the official code on CPU (outside the repo:
`LlamaAttention` and its RoPE helpers taken from modeling_llama.py, flash-attn replaced by a torch
softmax attention for `FlashSelfAttention` and a recorder for `flash_attn_with_kvcache`, which read
the official `sorted_atten_chunks` of the sequential prefill path; random hidden states and
projections, 1 sequence, 4 heads, dim 16): with RoPE made the identity (cos = 1, sin = 0) and the
projected q/k/v passed to `gates(q, k, v)`, the chunks chosen per query and head were identical in
all 10 cases (lengths 512 to 1024, window 16/32/64, atten_length 256/512, begin_selective_length
256 to 512, 2 seeds; 4 to 16 chunks kept of 12 to 32); with RoPE on, `chunk_keys` on the chunk-local
RoPE q/k equals the official `chunk_features_key` (max error 6e-8). Lengths were multiples of the
window.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn.methods._labels import label_layout
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods.base import BlockScorer, BlockScores, PrefillMethod

_CHUNK_ELEMENTS = 1 << 22  # chunk-attention logits formed at once (16 MiB)


@register("longheads")
@dataclasses.dataclass
class LongHeads(BlockScorer, PrefillMethod):
    """Args:
        window_size: chunk size in tokens. Paper: 256.
        atten_length: tokens (chunks x window_size) each query attends to. Paper: 4096.
        begin_selective_length: queries before this position attend to everything (causal). Paper: 4096.
        tile_size: the engine's tile (block_q = block_k).
    """

    window_size: int = 256
    atten_length: int = 4096
    begin_selective_length: int = 4096
    tile_size: int = 64

    keep_rule = "top_k"
    extra_context = ("v",)  # the official chunk summary uses the values (see the module docstring)

    def __post_init__(self):
        self.check_positive_ints("window_size", "atten_length", "tile_size")
        _checks.int_arg("begin_selective_length", self.begin_selective_length, minimum=0)
        if self.atten_length % self.window_size or self.atten_length < 3 * self.window_size:
            raise ValueError(f"atten_length ({self.atten_length}) must be a multiple of window_size "
                             f"({self.window_size}) holding at least 3 chunks (first, previous, current)")

    def chunk_keys(self, q: Tensor, k: Tensor, v: Tensor | None = None) -> Tensor:
        """`[B, Hq, nChunks, D]`: each chunk's attention-pooled key, per query head."""
        batch, heads, length, dim = q.shape
        w = self.window_size
        n_chunks = -(-length // w)
        pad = n_chunks * w - length
        heads_kv = k.shape[1]
        group = heads // heads_kv
        # The chunk summary is the mean of the chunk's attention outputs, mean_i(P_i) V_c: only the
        # probabilities' column means are needed, so the chunk attention is one logits GEMM, a softmax and
        # a row-vector product (half the attention's FLOPs, no output per token). Chunks in bands bound
        # the logits' memory; the query heads a key head serves are stacked row-wise (no key copies).
        split = [torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(batch, x.shape[1], n_chunks, w, dim)
                 for x in (q, k, k if v is None else v)]                                  # [B, H|Hkv, nC, w, D]
        queries = split[0].view(batch, heads_kv, group, n_chunks, w, dim)
        keys, values = split[1], split[2]
        valid = (torch.arange(n_chunks * w, device=q.device) < length).view(n_chunks, w)
        counts = valid.sum(-1)
        mean_probs = torch.empty(batch, heads_kv, n_chunks, group, w, device=q.device)
        band = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * w * w))
        for first in range(0, n_chunks, band):
            stop = min(n_chunks, first + band)
            rows = queries[:, :, :, first:stop].permute(0, 1, 3, 2, 4, 5).reshape(batch, heads_kv, stop - first,
                                                                                   group * w, dim)
            logits = (rows @ keys[:, :, first:stop].transpose(-1, -2)).mul_(dim ** -0.5)  # [B, Hkv, b, g*w, w]
            if pad and stop == n_chunks:  # the last chunk's padding keys take no part
                logits[:, :, -1].masked_fill_(~valid[-1], float("-inf"))
            probs = torch.softmax(logits, -1).view(batch, heads_kv, stop - first, group, w, w)
            if pad and stop == n_chunks:  # nor do its padding queries
                probs[:, :, -1].masked_fill_(~valid[-1].view(1, 1, w, 1), 0.0)
            mean_probs[:, :, first:stop] = probs.sum(4) / counts[first:stop].view(1, 1, -1, 1, 1)
        summary = mean_probs @ values                                                     # [B, Hkv, nC, g, D]
        pool = (summary @ keys.transpose(-1, -2)) * dim ** -0.5                           # [B, Hkv, nC, g, w]
        pool = torch.softmax(pool.masked_fill(~valid.view(1, 1, n_chunks, 1, w), float("-inf")), -1)
        chunk_keys = pool @ keys                                                          # [B, Hkv, nC, g, D]
        return chunk_keys.transpose(2, 3).reshape(batch, heads, n_chunks, dim)

    def gates(self, q: Tensor, k: Tensor, v: Tensor | None = None) -> Tensor:
        """bool `[B, Hq, L, nChunks]`: the chunks each query token attends to."""
        check_qk(q, k)
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"longheads selects for prefill: q_len ({q.shape[2]}) must equal k_len ({k.shape[2]})")
        blocks = self._score_blocks(q, k, causal=True, v=v)
        return self.keep_blocks(blocks, self._keep_value(blocks, None))

    def _score_blocks(self, q: Tensor, k: Tensor, *, causal: bool, v: Tensor | None = None) -> BlockScores:
        # per query token (block_q = 1) against chunks: first, previous and current chunk forced, the
        # visible ones allowed, and every chunk up to its own for a token before begin_selective_length
        length = q.shape[2]
        if v is not None and v.shape != k.shape:
            raise ValueError(f"v must have k's shape {list(k.shape)}, got {list(v.shape)}")
        n_chunks = -(-length // self.window_size)
        chunk_ids = torch.arange(n_chunks, device=q.device).view(1, -1)
        current = (torch.arange(length, device=q.device) // self.window_size).view(-1, 1)
        visible = chunk_ids <= current                                                    # [L, nC]
        scores = q.float() @ self.chunk_keys(q, k, v).transpose(-1, -2)                   # [B, H, L, nC]
        forced = (chunk_ids == 0) | (chunk_ids == current) | (chunk_ids == current - 1)
        early = (torch.arange(length, device=q.device) < self.begin_selective_length).view(-1, 1)
        return BlockScores(scores, 1, self.window_size, allowed=visible, forced=forced & visible,
                           always=early & visible)

    def _keep_value(self, blocks: BlockScores, layer: int | None) -> int:
        return min(self.atten_length // self.window_size, blocks.scores.shape[-1])

    def _layout(self, keep: Tensor, blocks: BlockScores, q: Tensor, k: Tensor, *, causal: bool) -> BlockLayout:
        if self.window_size % self.tile_size == 0:
            # chunks are whole tiles: each tile keeps the rows whose token chose its chunk (every token
            # keeps its own chunk, so no row is empty)
            return super()._layout(keep, blocks, q, k, causal=causal)
        batch, heads, length, _ = keep.shape
        token_ids = torch.arange(length, device=q.device).expand(batch, heads, length)
        chunk_of_key = (torch.arange(length, device=q.device) // self.window_size).expand(batch, heads, length)
        return label_layout(token_ids, chunk_of_key, keep, block_q=self.tile_size, block_k=self.tile_size,
                            causal=True)

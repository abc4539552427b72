"""Combiner: full attention in sub-quadratic cost through a structured factorisation.

Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost" (NeurIPS 2021).
Attention is read as a conditional expectation: each query's causal support is split into a direct
part, whose keys take part one by one, and regions, each summarised by one abstraction key and value.
One joint softmax runs over the direct logits and the region logits, and a region's probability is
spread inside it by a distribution that depends on the region, not on the query, so every earlier
token keeps a positive weight and each row sums to 1. Following the official code, a region's
abstraction query and key are element-wise max-pools of its queries and keys, and its value is the
pooled query's attention over the region (`identity-max`); the paper's default region size is 128.

- `combiner_fixed`: direct = own block (causal); regions = every earlier block.
- `combiner_logsparse`: direct = the token itself; regions = the aligned chunks given by the binary
  expansion of the position (level l: chunk of 2^l just before the query's own level-l chunk).
- `combiner_axial`: the sequence as rows of `row_length`; direct = own row (causal); regions = the
  earlier rows seen from the query's column: value = that column's query attending the whole row,
  key = a projection of it (`CombinerAttention`), the raw key, or the row-softmax-weighted key.

Each part is one `blockattn.attention` call on a block layout; the parts merge into the joint softmax
through their `lse` (`merge_attention`), so the engine computes only the factorisation's tiles.
Levels of Logsparse run to the highest bit of L - 1, so every position is covered for any L.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor, nn

import blockattn
from blockattn._checks import check_causal_self_attention, int_arg
from blockattn.layout import BlockLayout, _cdiv

__all__ = ["CombinerAttention", "combiner_axial", "combiner_fixed", "combiner_logsparse", "merge_attention"]

FACTORISATIONS = ("fixed", "logsparse", "axial")


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One softmax over the union of disjoint key sets, from each set's `(out [B, H, L, D], lse [B, H, L])`.

    Exact: `out = sum_p exp(lse_p - m) out_p / sum_p exp(lse_p - m)`; a part whose row saw no key
    (`lse = -inf`) gets weight 0. Differentiable through `lse` wherever the engine's lse is.
    Returns `(out, lse)` of the union.
    """
    lses = torch.stack([lse for _, lse in parts])
    # any shift gives the same value; a detached one keeps the gradient exactly the function's
    shift = lses.detach().amax(0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    weights = torch.exp(lses - shift)
    total = weights.sum(0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts)) / total.unsqueeze(-1)
    return out.to(parts[0][0].dtype), shift + torch.log(total)


def _region_summaries(q: Tensor, k: Tensor, v: Tensor, size: int, scale: float, backend: str):
    """Per aligned region of `size` tokens (the last may be shorter): the max-pooled query `[B, Hq, n, D]`
    and key `[B, Hkv, n, D]`, and the value `[B, Hq, n, D]`, the pooled query's attention over its region."""
    length = q.shape[2]
    n = _cdiv(length, size)
    pad = n * size - length

    def pool(x):
        x = torch.nn.functional.pad(x, (0, 0, 0, pad), value=float("-inf"))
        return x.view(*x.shape[:2], n, size, x.shape[3]).amax(3)

    q_bar, k_bar = pool(q), pool(k)
    v_bar = blockattn.attention(q_bar, k, v, _own_region(length, size, q.device), scale=scale, backend=backend)
    return q_bar, k_bar, v_bar


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    # region values are per query head (the pooled query is), so their keys are repeated to match
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _check(q, k, v, scale):
    return check_causal_self_attention(q, k, v, scale, "Combiner")


# Layouts depend only on lengths and sizes: built once per shape (a module runs them every step).
@functools.lru_cache(maxsize=256)
def _own_region(length: int, size: int, device) -> BlockLayout:
    """One pooled query per region attending its own region's tokens."""
    n = _cdiv(length, size)
    return BlockLayout.from_dense(torch.eye(n, dtype=torch.bool, device=device), q_len=n, k_len=length,
                                  block_q=1, block_k=size)


@functools.lru_cache(maxsize=64)
def _earlier_regions(length: int, size: int, device) -> BlockLayout:
    """Fixed: query i sees the summaries of blocks before its own."""
    n = _cdiv(length, size)
    layout = BlockLayout.from_token_mask(lambda b, h, i, j: j < i // size, q_len=length, k_len=n, block_q=size,
                                         block_k=min(size, n), allow_empty_rows=True)
    return _to_device(layout, device)


@functools.lru_cache(maxsize=64)
def _logsparse_direct(length: int, device) -> BlockLayout:
    # level 0's region is a single token, so its summary is that token: it joins the direct call
    layout = BlockLayout.from_token_mask(lambda b, h, i, j: (j == i) | ((j == i - 1) & (i % 2 == 1)),
                                         q_len=length, k_len=length, block_q=min(64, length),
                                         block_k=min(64, length))
    return _to_device(layout, device)


@functools.lru_cache(maxsize=256)
def _logsparse_level(length: int, level: int, device) -> BlockLayout:
    """Query i with chunk m = i >> level odd sees the summary of chunk m - 1."""
    size = 1 << level
    n = _cdiv(length, size)
    chunk = torch.arange(n, device=device)
    previous = (chunk.view(-1, 1) % 2 == 1) & (chunk.view(1, -1) == chunk.view(-1, 1) - 1)
    return BlockLayout.from_dense(previous, q_len=length, k_len=n, block_q=size, block_k=1, allow_empty_rows=True)


@functools.lru_cache(maxsize=64)
def _same_column_earlier_rows(length: int, rows: int, device) -> BlockLayout:
    """Axial in column-major order: blocks of `rows` positions (one column), strictly causal inside."""
    layout = BlockLayout.from_token_mask(lambda b, h, i, j: (i // rows == j // rows) & (j < i), q_len=length,
                                         k_len=length, block_q=rows, block_k=rows, allow_empty_rows=True)
    return _to_device(layout, device)


@functools.lru_cache(maxsize=128)
def _block_diagonal(length: int, size: int, device, *, causal: bool) -> BlockLayout:
    n = _cdiv(length, size)
    return BlockLayout.from_dense(torch.eye(n, dtype=torch.bool, device=device), q_len=length, k_len=length,
                                  block_q=size, block_k=size, causal=causal)


def _to_device(layout: BlockLayout, device) -> BlockLayout:
    return layout if layout.device == torch.device(device) else layout.to(device)


def combiner_fixed(q: Tensor, k: Tensor, v: Tensor, *, block_size: int = 128, scale: float | None = None,
                   backend: str = "auto", return_lse: bool = False):
    """Combiner-Fixed: own block causally plus one abstraction per earlier block. Cost O(L (s + L/s)).

    q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]` -> `[B, Hq, L, D]` (and the joint `lse [B, Hq, L]`).
    """
    scale = _check(q, k, v, scale)
    size = int_arg("block_size", block_size)
    length, heads = q.shape[2], q.shape[1]
    n = _cdiv(length, size)
    parts = [blockattn.attention(q, k, v, _block_diagonal(length, size, q.device, causal=True), scale=scale,
                                 backend=backend, return_lse=True)]
    if n > 1:
        _, k_bar, v_bar = _region_summaries(q, k, v, size, scale, backend)
        parts.append(blockattn.attention(q, _repeat_heads(k_bar, heads), v_bar,
                                         _earlier_regions(length, size, q.device), scale=scale, backend=backend,
                                         return_lse=True))
    out, lse = merge_attention(parts)
    return (out, lse) if return_lse else out


def logsparse_levels(length: int) -> int:
    """Number of Logsparse levels for `length` tokens: one per bit of the largest position `length - 1`."""
    return max(length - 1, 0).bit_length()


def combiner_logsparse(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str = "auto",
                       return_lse: bool = False):
    """Combiner-Logsparse: the token itself plus, for each set bit l of its position i, the summary of
    the 2^l-chunk `i // 2^l - 1`; these chunks tile `[0, i)` exactly. At most log2 L + 1 logits per query.

    q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]` -> `[B, Hq, L, D]` (and the joint `lse [B, Hq, L]`).
    """
    scale = _check(q, k, v, scale)
    length, heads = q.shape[2], q.shape[1]
    parts = [blockattn.attention(q, k, v, _logsparse_direct(length, q.device), scale=scale, backend=backend,
                                 return_lse=True)]
    for level in range(1, logsparse_levels(length)):
        _, k_bar, v_bar = _region_summaries(q, k, v, 1 << level, scale, backend)
        parts.append(blockattn.attention(q, _repeat_heads(k_bar, heads), v_bar,
                                         _logsparse_level(length, level, q.device), scale=scale,
                                         backend=backend, return_lse=True))
    out, lse = merge_attention(parts)
    return (out, lse) if return_lse else out


def combiner_axial(q: Tensor, k: Tensor, v: Tensor, *, row_length: int = 128,
                   summary_key: str | Callable[[Tensor], Tensor] = "none", scale: float | None = None,
                   backend: str = "auto", return_lse: bool = False):
    """Combiner-Axial (row-major): own row causally, plus the same column of every earlier row, whose
    value `u` is that position's query attending its whole row (bidirectional: the row is in the past).

    `summary_key` gives the abstraction keys: "none" (the raw key of that position), "wsum" (the
    row-softmax-weighted keys), or a callable `u [B, Hq, L, D] -> keys [B, Hq, L, D]` (the paper's
    learned projection, see `CombinerAttention`). `L` must be a multiple of `row_length`.
    """
    scale = _check(q, k, v, scale)
    size = int_arg("row_length", row_length)
    batch, heads, length, dim = q.shape
    if length % size:
        raise ValueError(f"combiner_axial views the sequence as rows: L={length} must be a multiple of "
                         f"row_length={size}")
    if not (summary_key in ("none", "wsum") or callable(summary_key)):
        raise ValueError(f"summary_key must be 'none', 'wsum' or a callable, got {summary_key!r}")
    rows = length // size
    parts = [blockattn.attention(q, k, v, _block_diagonal(length, size, q.device, causal=True), scale=scale,
                                 backend=backend, return_lse=True)]
    if rows > 1:
        row_layout = _block_diagonal(length, size, q.device, causal=False)
        u = blockattn.attention(q, k, v, row_layout, scale=scale, backend=backend)
        if summary_key == "none":
            keys = _repeat_heads(k, heads)
        elif summary_key == "wsum":
            keys = blockattn.attention(q, k, k, row_layout, scale=scale, backend=backend)
        else:
            keys = summary_key(u)
            if not isinstance(keys, Tensor) or keys.shape != q.shape:
                raise ValueError(f"summary_key must return a tensor shaped like q {list(q.shape)}")

        # column-major order makes "same column, earlier row" a block-diagonal, strictly causal layout
        def by_column(x):
            return x.reshape(*x.shape[:2], rows, size, -1).transpose(2, 3).reshape(*x.shape[:2], length, -1)

        out, lse = blockattn.attention(by_column(q), by_column(keys), by_column(u),
                                       _same_column_earlier_rows(length, rows, q.device), scale=scale,
                                       backend=backend, return_lse=True)
        out = out.view(batch, heads, size, rows, dim).transpose(2, 3).reshape(batch, heads, length, dim)
        lse = lse.view(batch, heads, size, rows).transpose(2, 3).reshape(batch, heads, length)
        parts.append((out, lse))
    out, lse = merge_attention(parts)
    return (out, lse) if return_lse else out


class CombinerAttention(nn.Module):
    """Causal multi-head self-attention with a Combiner factorisation, over `x [B, L, dim]`.

    `factorisation` is "fixed", "logsparse" or "axial"; `block_size` is the region (Fixed) or row
    (Axial) length, 128 in the paper's language-model configs. Axial uses the official `proj` row
    summary: abstraction key = W2 · LayerNorm(x + W1 · u), split into heads.
    """

    def __init__(self, dim: int, heads: int, *, factorisation: str = "fixed", block_size: int = 128,
                 qkv_bias: bool = False, backend: str = "auto"):
        super().__init__()
        int_arg("dim", dim)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"heads must be a positive int dividing dim={dim}, got {heads!r}")
        if factorisation not in FACTORISATIONS:
            raise ValueError(f"factorisation must be one of {FACTORISATIONS}, got {factorisation!r}")
        self.dim, self.heads, self.factorisation, self.backend = dim, heads, factorisation, backend
        self.block_size = int_arg("block_size", block_size)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if factorisation == "axial":
            self.summary_in = nn.Linear(dim, dim)
            self.summary_norm = nn.LayerNorm(dim)
            self.summary_out = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.dim)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, L, {self.dim}], got {list(x.shape)}")
        q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        if self.factorisation == "fixed":
            out = combiner_fixed(q, k, v, block_size=self.block_size, backend=self.backend)
        elif self.factorisation == "logsparse":
            out = combiner_logsparse(q, k, v, backend=self.backend)
        else:
            def project(u):
                return self._split(self.summary_out(self.summary_norm(x + self.summary_in(self._merge(u)))))
            out = combiner_axial(q, k, v, row_length=self.block_size, summary_key=project, backend=self.backend)
        return self.proj(self._merge(out))

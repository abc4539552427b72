"""Landmark Attention: a landmark token per block gates access to that block.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023). The token stream carries a landmark after every `block_size - 1` regular tokens
(paper: 50 regular tokens per block). A query in block c takes one softmax over its own block's
regular tokens `j <= i` and the landmark keys of the earlier blocks; each earlier block's weight is
then spread over its regular tokens by a softmax inside the block (the grouped softmax). Landmark
values are never read, a block's own landmark is never its queries' key, and landmarks are not
prediction targets. At inference each query retrieves only the top-k earlier blocks by its landmark
scores (paper default: per token and head) and runs the same grouped softmax over them plus its own
block, so only k + 1 blocks are read.

Training form (`grouped_softmax_attention`): the grouped softmax is one ordinary softmax over the
regular tokens with a per-(query, block) bias `s(i, landmark_g) - LSE_{j in block g} s(i, j)`. The
per-block LSEs come from one engine call per block offset (their `lse`), and the bias is folded
into extra q/k channels (`q' = [c q, bias_g]`, `k' = [k, onehot(block)]`), so one engine call with
landmark columns masked gives the result and its gradient. Retrieval (`landmark_retrieval`): one
call per retrieval rank with a layout listing each query's r-th block, plus the own-block call,
merged through lse with the landmark logits as the blocks' weights. Unlike the official cache,
retrieved blocks keep their original positions (this is exact attention over them, no remapping).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

import blockattn
from blockattn._checks import check_causal_self_attention
from blockattn.functional import MAX_HEAD_DIM
from blockattn.layout import BlockLayout, _cdiv
from blockattn.modules.combiner import merge_attention

__all__ = ["grouped_softmax_attention", "insert_landmarks", "landmark_logits", "landmark_retrieval",
           "landmark_targets", "retrieve_blocks"]

AGGREGATES = ("per_token", "max_over_tokens")


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (regular tokens plus one landmark), got {block_size!r}")
    return block_size


def _check(q, k, v, block_size, scale):
    scale = check_causal_self_attention(q, k, v, scale, "landmark attention")
    _check_block_size(block_size)
    return scale


# ---------------------------------------------------------------------- data
def insert_landmarks(tokens: Tensor, *, block_size: int, landmark_id: int) -> Tensor:
    """`[B, N]` token ids -> the stream with `landmark_id` after every `block_size - 1` regular tokens."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a [B, N] tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    regular = _check_block_size(block_size) - 1
    batch, n = tokens.shape
    full = n // regular
    blocks = tokens[:, :full * regular].view(batch, full, regular)
    marks = torch.full((batch, full, 1), landmark_id, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([torch.cat([blocks, marks], 2).flatten(1), tokens[:, full * regular:]], 1)


def landmark_targets(stream: Tensor, *, landmark_id: int, ignore_index: int = -100) -> Tensor:
    """Next-token targets for a stream with landmarks: a landmark is skipped over (the position before it
    predicts the token after it) and positions holding a landmark predict nothing (`ignore_index`)."""
    nxt = torch.full_like(stream, ignore_index)
    nxt[:, :-1] = stream[:, 1:]
    after = torch.full_like(stream, ignore_index)
    after[:, :-2] = stream[:, 2:]
    targets = torch.where(nxt == landmark_id, after, nxt)
    return torch.where(stream == landmark_id, torch.full_like(stream, ignore_index), targets)


# ---------------------------------------------------------------------- layouts
def _regular_columns(block_size: int, rows: int, device) -> Tensor:
    """bool `[1, rows, block_size]` tile mask: every key but the block's landmark (its last slot)."""
    mask = torch.ones(1, rows, block_size, dtype=torch.bool, device=device)
    mask[..., -1] = False
    return mask


@functools.lru_cache(maxsize=64)
def _own_block_layout(length: int, block_size: int, device) -> BlockLayout:
    n = _cdiv(length, block_size)
    return BlockLayout(torch.ones(1, 1, n, dtype=torch.int32, device=device),
                       torch.arange(n, dtype=torch.int32, device=device).view(1, 1, n, 1),
                       q_len=length, k_len=length, block_q=block_size, block_k=block_size, causal=True,
                       tile_mask_ids=torch.zeros(1, 1, n, 1, dtype=torch.int32, device=device),
                       tile_masks=_regular_columns(block_size, block_size, device))


@functools.lru_cache(maxsize=64)
def _causal_regular_layout(length: int, block_size: int, device) -> BlockLayout:
    n = _cdiv(length, block_size)
    ids = torch.arange(n, dtype=torch.int32, device=device)
    indices = torch.where(ids.view(1, -1) <= ids.view(-1, 1), ids.view(1, -1), -1)
    return BlockLayout((ids + 1).view(1, 1, n), indices.view(1, 1, n, n), q_len=length, k_len=length,
                       block_q=block_size, block_k=block_size, causal=True,
                       tile_mask_ids=torch.zeros(1, 1, n, n, dtype=torch.int32, device=device),
                       tile_masks=_regular_columns(block_size, block_size, device))


def _one_block_per_row(blocks: Tensor, length: int, block_q: int, block_size: int,
                       k_len: int | None = None) -> BlockLayout:
    """Each query block (`block_q` rows) lists the one key block `blocks[..., row]` (-1: none), its
    landmark column masked. `blocks` is int `[B|1, H|1, nQ]`."""
    listed = blocks >= 0
    return BlockLayout(listed.to(torch.int32), torch.where(listed, blocks, -1).unsqueeze(-1).to(torch.int32),
                       q_len=length, k_len=length if k_len is None else k_len, block_q=block_q, block_k=block_size,
                       tile_mask_ids=torch.where(listed, 0, -1).unsqueeze(-1).to(torch.int32),
                       tile_masks=_regular_columns(block_size, block_q, blocks.device), allow_empty_rows=True)


@functools.lru_cache(maxsize=64)
def _offsets_layout(length: int, block_size: int, device) -> BlockLayout:
    """Queries repeated once per block offset 1..nb-1 along the query axis (`[(nb-1) L]`, L a multiple of
    `block_size`): in copy o, query block I lists key block I - o, so one call gives every query's LSE
    over each earlier block."""
    n = _cdiv(length, block_size)
    blocks = torch.arange(n, device=device).view(1, -1) - torch.arange(1, n, device=device).view(-1, 1)
    return _one_block_per_row(blocks.reshape(1, 1, -1), (n - 1) * length, block_size, block_size, k_len=length)


# ---------------------------------------------------------------------- attention
def landmark_logits(q: Tensor, k: Tensor, *, block_size: int, scale: float | None = None) -> Tensor:
    """`[B, Hq, L, nb]` scaled logits of every query against every block's landmark key (not masked:
    callers keep only earlier blocks; a trailing partial block gets 0)."""
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    landmarks = k[:, :, block_size - 1::block_size]
    landmarks = landmarks.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ landmarks.transpose(-1, -2)) * scale
    # a trailing partial block has no landmark yet; it is only ever a query's own block
    missing = _cdiv(q.shape[2], block_size) - logits.shape[-1]
    return torch.nn.functional.pad(logits, (0, missing)) if missing else logits


def grouped_softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, scale: float | None = None,
                              backend: str = "auto") -> Tensor:
    """The grouped softmax over all earlier blocks (the training form), as one engine softmax with the
    per-(query, block) bias folded into extra channels. q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]`;
    landmarks sit at positions `block_size - 1, 2 block_size - 1, ...`. Needs `D + nb <= 256`."""
    scale = _check(q, k, v, block_size, scale)
    batch, heads, length, dim = q.shape
    n = _cdiv(length, block_size)
    if dim + n > MAX_HEAD_DIM:
        raise ValueError(f"the bias fold needs head dim + blocks <= {MAX_HEAD_DIM}, got "
                         f"{dim} + {n}; use landmark_retrieval for long inputs")
    query_block = torch.arange(length, device=q.device) // block_size
    # LSE of each query over the regular tokens of the block `offset` blocks back, from one call whose
    # query axis holds a copy of the (block-padded) queries per offset: O(L nb D) transient memory,
    # the price of the exact all-blocks training form (retrieval reads only k blocks)
    padded = n * block_size
    lse_back = torch.zeros(batch, heads, length, 1, device=q.device)
    if n > 1:
        q_pad = torch.nn.functional.pad(q, (0, 0, 0, padded - length)).repeat(1, 1, n - 1, 1)
        k_pad, v_pad = (torch.nn.functional.pad(t, (0, 0, 0, padded - length)) for t in (k, v))
        _, lse = blockattn.attention(q_pad, k_pad, v_pad, _offsets_layout(padded, block_size, q.device),
                                     scale=scale, backend=backend, return_lse=True)
        lse = lse.view(batch, heads, n - 1, padded)[..., :length].permute(0, 1, 3, 2)
        lse_back = torch.cat([lse_back, lse], -1)  # [B, H, L, offset]
    offsets = (query_block.view(-1, 1) - torch.arange(n, device=q.device).view(1, -1))  # [L, nb]
    earlier = offsets > 0
    lse_block = torch.gather(lse_back, 3, offsets.clamp(0, n - 1).expand(batch, heads, length, n))
    bias = torch.where(earlier, landmark_logits(q, k, block_size=block_size, scale=scale) - lse_block, 0.0)
    onehot = torch.nn.functional.one_hot(torch.arange(length, device=q.device) // block_size, n).to(q.dtype)
    q_fold = torch.cat([q * scale, bias.to(q.dtype)], -1)
    k_fold = torch.cat([k, onehot.expand(batch, k.shape[1], length, n)], -1)
    v_fold = torch.nn.functional.pad(v, (0, n))
    out = blockattn.attention(q_fold, k_fold, v_fold, _causal_regular_layout(length, block_size, q.device),
                              scale=1.0, backend=backend)
    return out[..., :dim]


def retrieve_blocks(q: Tensor, k: Tensor, *, block_size: int, top_k: int, aggregate: str = "per_token",
                    scale: float | None = None) -> Tensor:
    """The earlier blocks each query reads: int `[B, Hq, rows, top_k]` (-1 where fewer blocks exist),
    best first, by the softmax of the landmark logits over earlier blocks. `aggregate="per_token"`
    (the paper's default): rows = L, one choice per token and head; `"max_over_tokens"`: rows = nb,
    one choice per query block and head (max of the token softmaxes)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    length = q.shape[2]
    n = _cdiv(length, block_size)
    logits = landmark_logits(q, k, block_size=block_size, scale=scale)
    query_block = torch.arange(length, device=q.device) // block_size
    earlier = torch.arange(n, device=q.device).view(1, -1) < query_block.view(-1, 1)
    scores = torch.softmax(logits.masked_fill(~earlier, float("-inf")), -1).nan_to_num(0.0)
    if aggregate == "max_over_tokens":
        pad = n * block_size - length
        scores = torch.nn.functional.pad(scores, (0, 0, 0, pad)).view(*scores.shape[:2], n, block_size, n).amax(3)
        earlier = torch.arange(n, device=q.device).view(1, -1) < torch.arange(n, device=q.device).view(-1, 1)
    k_eff = min(top_k, n)
    top = scores.masked_fill(~earlier, -1.0).topk(k_eff, dim=-1)
    return torch.where(top.values >= 0, top.indices, -1)


def landmark_retrieval(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int = 2,
                       aggregate: str = "per_token", scale: float | None = None, backend: str = "auto",
                       return_blocks: bool = False):
    """Inference: the grouped softmax over each query's own block plus its `top_k` retrieved earlier
    blocks (`retrieve_blocks`), as `top_k + 1` engine calls merged through lse. With `top_k` at least
    the number of blocks this equals `grouped_softmax_attention`. Returns `out [B, Hq, L, D]` (and the
    retrieved block ids)."""
    scale = _check(q, k, v, block_size, scale)
    length = q.shape[2]
    blocks = retrieve_blocks(q, k, block_size=block_size, top_k=top_k, aggregate=aggregate, scale=scale)
    parts = [blockattn.attention(q, k, v, _own_block_layout(length, block_size, q.device), scale=scale,
                                 backend=backend, return_lse=True)]
    logits = landmark_logits(q, k, block_size=block_size, scale=scale)
    block_q = 1 if aggregate == "per_token" else block_size
    for rank in range(blocks.shape[-1]):
        chosen = blocks[..., rank]
        out = blockattn.attention(q, k, v, _one_block_per_row(chosen, length, block_q, block_size), scale=scale,
                                  backend=backend)
        per_token = chosen if block_q == 1 else chosen.repeat_interleave(block_size, -1)[..., :length]
        weight = torch.gather(logits, 3, per_token.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        parts.append((out, torch.where(per_token >= 0, weight.float(), float("-inf"))))
    out, _ = merge_attention(parts)
    return (out, blocks) if return_blocks else out

"""Head-parallel attention for dynamic methods (Ulysses): sequence shards in, head groups over the full sequence
inside, sequence shards out.

Based on DeepSpeed-Ulysses (https://arxiv.org/abs/2309.14509) and USP (https://github.com/feifeibear/long-context-attention).
The rule: rank s gathers the whole sequence of KV-head group s (and its query heads) by one all-to-all, so a
method that selects its layout from q and k (XAttention, MoBA, ...) runs exactly as in one process on those
heads, then a second all-to-all returns each rank its tokens of every head. Needs `Hkv % P == 0` (the GQA
limit of Ulysses); traffic per rank is (q + k + v + out) x (P-1)/P of its shard, whatever the layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn import methods
from blockattn.distributed.api import _validate
from blockattn.distributed.comm import _exchange
from blockattn.distributed.plan import Plan
from blockattn.functional import attention as _local_attention
from blockattn.layout import BlockLayout

__all__ = ["head_parallel_attention"]


def _seq_to_heads(x: Tensor, plan: Plan, rank: int, group) -> Tensor:
    """`[B, H, L_r, D]` shards -> `[B, H/P, L, D]`: rank s gets head group s of every token."""
    world, h = plan.world_size, x.shape[1] // plan.world_size
    sends = {s: x[:, s * h:(s + 1) * h].contiguous() for s in range(world) if s != rank}
    recvs = {r: x.new_empty(x.shape[0], h, plan.local_len(r), x.shape[3]) for r in range(world) if r != rank}
    _exchange(sends, recvs, group)
    recvs[rank] = x[:, rank * h:(rank + 1) * h]
    full = x.new_empty(x.shape[0], h, plan.seq_len, x.shape[3])
    for r, piece in recvs.items():
        full.index_copy_(2, plan.token_index(r).to(x.device), piece)
    return full


def _heads_to_seq(y: Tensor, plan: Plan, rank: int, group) -> Tensor:
    """The inverse: `[B, H/P, L, D]` -> `[B, H, L_r, D]`."""
    world, h = plan.world_size, y.shape[1]
    sends = {r: y.index_select(2, plan.token_index(r).to(y.device)) for r in range(world) if r != rank}
    recvs = {s: y.new_empty(y.shape[0], h, plan.local_len(rank), y.shape[3]) for s in range(world) if s != rank}
    _exchange(sends, recvs, group)
    recvs[rank] = y.index_select(2, plan.token_index(rank).to(y.device))
    return torch.cat([recvs[s] for s in range(world)], dim=1)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, rank, group):
        ctx.args = (plan, rank, group)
        return _seq_to_heads(x, plan, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), *ctx.args), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, plan, rank, group):
        ctx.args = (plan, rank, group)
        return _heads_to_seq(y, plan, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), *ctx.args), None, None, None


def _head_slice(layout: BlockLayout, first: int, count: int) -> BlockLayout:
    if layout.heads == 1:
        return layout
    heads = slice(first, first + count)
    return BlockLayout(layout.kv_counts[:, heads], layout.kv_indices[:, heads], q_len=layout.q_len,
                       k_len=layout.k_len, block_q=layout.block_q, block_k=layout.block_k, causal=layout.causal,
                       window=layout.window, allow_empty_rows=True,
                       tile_mask_ids=None if layout.tile_mask_ids is None else layout.tile_mask_ids[:, heads],
                       tile_masks=layout.tile_masks)


def head_parallel_attention(q: Tensor, k: Tensor, v: Tensor, method, layout: BlockLayout, *, group=None,
                            return_lse: bool = False, plan: Plan | None = None, scale: float | None = None,
                            backend: str = "auto"):
    """Attention whose layout a method selects from q and k, with the sequence sharded across `group`.

    Args:
        q (Tensor):
            `[B, Hq, L_r, D]`, this rank's query shard as laid out by `shard(q_full, layout, group)`.
        k, v (Tensor):
            `[B, Hkv, L_r, D]`, the key and value shards; `Hkv` must be a multiple of the group size.
        method (Method | BlockLayout):
            a `blockattn.methods` object (selects per head on the full sequence), or a fixed global layout.
        layout (BlockLayout):
            the layout the shards were laid out by (it fixes the ownership, e.g. `patterns.causal(L)`).
        group (ProcessGroup, Optional):
            the context-parallel group. Default: the default group.
        return_lse (bool, Optional):
            also return the lse shard `[B, Hq, L_r]`. Default: False.
        plan (Plan, Optional):
            `layout`'s precomputed plan. Default: the cached one.
        scale (float, Optional):
            score scale. Default: `D ** -0.5`.
        backend (str, Optional):
            the local engine's backend. Default: "auto".

    Returns:
        `out [B, Hq, L_r, D]` (and `lse` when asked): this rank's shard of
        `blockattn.sparse_attention(q_full, k_full, v_full, method)`. Differentiable in q, k, v.
    """
    def heads_divide(world):
        if not isinstance(method, (methods.Method, BlockLayout)):
            raise TypeError(f"method must be a blockattn.methods.Method or a BlockLayout, got {type(method).__name__}")
        if k.shape[1] % world:
            raise ValueError(f"head-parallel attention needs key/value heads divisible by the group size: "
                             f"{k.shape[1]} KV heads over {world} ranks")
        # a fixed layout is checked here, before any exchange: a rank failing later would strand the others
        if isinstance(method, BlockLayout):
            if (method.q_len, method.k_len) != (layout.q_len, layout.k_len):
                raise ValueError(f"method layout is built for ({method.q_len}, {method.k_len}) tokens, the "
                                 f"sequence has {layout.q_len}")
            if method.heads not in (1, q.shape[1]) or method.batch not in (1, q.shape[0]):
                raise ValueError(f"method layout B|H=({method.batch}, {method.heads}) does not broadcast to "
                                 f"batch {q.shape[0]} and {q.shape[1]} query heads")

    rank, world, resolved = _validate(q, k, v, layout, plan, group, extra=heads_divide)
    hq, hkv = q.shape[1] // world, k.shape[1] // world
    qh, kh, vh = (_SeqToHeads.apply(t, resolved, rank, group) for t in (q, k, v))
    if isinstance(method, BlockLayout):
        local = _head_slice(method, rank * hq, hq)
    else:
        local = method.select(qh.detach(), kh.detach())
    out, lse = _local_attention(qh, kh, vh, local, scale=scale, return_lse=True, backend=backend)
    out = _HeadsToSeq.apply(out, resolved, rank, group)
    if not return_lse:
        return out
    return out, _HeadsToSeq.apply(lse.unsqueeze(-1), resolved, rank, group).squeeze(-1)

"""Targeted point-to-point exchange of K/V blocks (forward) and of their gradients back to the owner (backward).

Based on MagiAttention's GroupCast / GroupReduce (https://github.com/SandAI-org/MagiAttention): each block
goes only to the ranks whose queries list it, and each rank's dK/dV partials of a foreign block are sent to
its owner and summed there. Transport is `torch.distributed` batched `isend`/`irecv` (gloo on CPU, NCCL on
GPU), one message per (src, dst) pair that has anything to move; K and V travel in one buffer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from blockattn.distributed.plan import RankPlan


def _global(group, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def _exchange(sends: dict, recvs: dict, group) -> None:
    """Post every send and receive of one step at once, then wait for all (no ordering deadlock)."""
    ops = [dist.P2POp(dist.isend, buf, _global(group, dst), group) for dst, buf in sorted(sends.items())]
    ops += [dist.P2POp(dist.irecv, buf, _global(group, src), group) for src, buf in sorted(recvs.items())]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


class GatherKV(torch.autograd.Function):
    """`GatherKV.apply(k, v, rank_plan, group) -> (k_gathered, v_gathered)`: the key blocks this rank's
    queries need, in global block order, `[B, Hkv, gathered_len, D]`. Backward index-adds the own rows
    into dK/dV and sends the foreign rows' gradients to their owners, which add them up."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, plan: RankPlan, group):
        batch, heads, _, dim = k.shape
        sends = {dst: torch.stack([k.index_select(2, idx), v.index_select(2, idx)])
                 for dst, idx in plan.send_local.items()}
        recvs = {src: k.new_empty(2, batch, heads, len(pos), dim) for src, pos in plan.recv_pos.items()}
        _exchange(sends, recvs, group)
        kg = k.new_empty(batch, heads, plan.gathered_len, dim)
        vg = v.new_empty(batch, heads, plan.gathered_len, dim)
        kg.index_copy_(2, plan.own_pos, k.index_select(2, plan.own_local))
        vg.index_copy_(2, plan.own_pos, v.index_select(2, plan.own_local))
        for src, pos in plan.recv_pos.items():
            kg.index_copy_(2, pos, recvs[src][0])
            vg.index_copy_(2, pos, recvs[src][1])
        ctx.plan, ctx.group, ctx.local_len = plan, group, k.shape[2]
        return kg, vg

    @staticmethod
    def backward(ctx, gk: Tensor, gv: Tensor):
        plan, group = ctx.plan, ctx.group
        batch, heads, _, dim = gk.shape
        # the reverse of the forward: what was received goes back to its owner, what was sent comes back
        sends = {src: torch.stack([gk.index_select(2, pos), gv.index_select(2, pos)])
                 for src, pos in plan.recv_pos.items()}
        recvs = {dst: gk.new_empty(2, batch, heads, len(idx), dim) for dst, idx in plan.send_local.items()}
        _exchange(sends, recvs, group)
        dk = gk.new_zeros(batch, heads, ctx.local_len, dim)
        dv = gv.new_zeros(batch, heads, ctx.local_len, dim)
        dk.index_add_(2, plan.own_local, gk.index_select(2, plan.own_pos))
        dv.index_add_(2, plan.own_local, gv.index_select(2, plan.own_pos))
        for dst, idx in sorted(plan.send_local.items()):
            dk.index_add_(2, idx, recvs[dst][0])
            dv.index_add_(2, idx, recvs[dst][1])
        return dk, dv, None, None

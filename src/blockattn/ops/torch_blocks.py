"""Portable block-sparse attention in plain PyTorch: the fallback on any device.

Query blocks are processed one at a time; for each, the listed key tiles are gathered in
chunks and merged with an online softmax, so memory beyond the inputs stays O(L). Backward
recomputes the probabilities from the saved log-sum-exp (FlashAttention's trick) instead of
storing them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.ops._autograd import LayoutAttention

_SLOT_CHUNK = 32  # key tiles gathered at once: bounds the per-step working set to ~32 * block_k keys


class _Plan:
    """Per-call index tensors shared by forward and backward."""

    def __init__(self, layout: BlockLayout, batch: int, heads_q: int, heads_kv: int, device):
        self.layout = layout
        self.batch, self.heads_q, self.heads_kv = batch, heads_q, heads_kv
        self.group = heads_q // heads_kv
        self.n_q, self.n_k = layout.num_q_blocks, layout.num_k_blocks
        self.block_q, self.block_k = layout.block_q, layout.block_k
        expanded = layout.to(device).expand(batch, heads_q)
        self.counts, self.indices = expanded.kv_counts, expanded.kv_indices
        self.expanded = expanded
        self.b = torch.arange(batch, device=device).view(batch, 1, 1)
        self.h = torch.arange(heads_q, device=device).view(1, heads_q, 1)
        self.h_kv = self.h // self.group

    def slots(self, q_block: int):
        """Chunks of (slot range, key-block ids [B, Hq, C], token mask [B, Hq, bq, C, bk])."""
        width = int(self.counts[:, :, q_block].max())
        for start in range(0, width, _SLOT_CHUNK):
            stop = min(width, start + _SLOT_CHUNK)
            ids = self.indices[:, :, q_block, start:stop]
            listed = ids >= 0
            ids = ids.clamp(min=0).long()
            b = self.b.expand_as(ids)
            h = self.h.expand_as(ids)
            q_blocks = torch.full_like(ids, q_block)
            mask = self.expanded.tile_token_masks(b.flatten(), h.flatten(), q_blocks.flatten(), ids.flatten())
            mask = mask.view(*ids.shape, self.block_q, self.block_k) & listed[..., None, None]
            yield ids, mask.permute(0, 1, 3, 2, 4)  # [B, Hq, bq, C, bk]

    def gather(self, blocks: Tensor, ids: Tensor) -> Tensor:
        """Tiles `[B, Hq, C, bk, D]` of `blocks [B, Hkv, nK, bk, D]` for each query head's key blocks."""
        return blocks[self.b, self.h_kv, ids]


def _pad_blocks(x: Tensor, length: int, block: int) -> Tensor:
    pad = length - x.shape[2]
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], x.shape[1], length // block, block, x.shape[3])


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q, k, v, plan: _Plan, scale: float):
    work = _compute_dtype(q.dtype)
    bq, bk = plan.block_q, plan.block_k
    q_blocks = _pad_blocks(q, plan.n_q * bq, bq)
    k_blocks = _pad_blocks(k, plan.n_k * bk, bk)
    v_blocks = _pad_blocks(v, plan.n_k * bk, bk)
    batch, heads_q, dim = q.shape[0], q.shape[1], q.shape[3]
    out = torch.zeros(batch, heads_q, plan.n_q, bq, v.shape[3], dtype=work, device=q.device)
    lse = torch.full((batch, heads_q, plan.n_q, bq), float("-inf"), dtype=work, device=q.device)
    for i in range(plan.n_q):
        qi = q_blocks[:, :, i].to(work)
        row_max = torch.full((batch, heads_q, bq), float("-inf"), dtype=work, device=q.device)
        row_sum = torch.zeros(batch, heads_q, bq, dtype=work, device=q.device)
        acc = torch.zeros(batch, heads_q, bq, v.shape[3], dtype=work, device=q.device)
        for ids, mask in plan.slots(i):
            kt = plan.gather(k_blocks, ids).to(work)  # [B, Hq, C, bk, D]
            vt = plan.gather(v_blocks, ids).to(work)
            scores = torch.einsum("bhqd,bhckd->bhqck", qi, kt) * scale
            scores = scores.masked_fill(~mask, float("-inf")).flatten(3)
            new_max = torch.maximum(row_max, scores.amax(-1))
            safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)
            probs = torch.exp(scores - safe_max.unsqueeze(-1))
            correction = torch.exp(row_max - safe_max)
            row_sum = row_sum * correction + probs.sum(-1)
            acc = acc * correction.unsqueeze(-1) + torch.einsum("bhqn,bhnd->bhqd", probs, vt.flatten(2, 3))
            row_max = new_max
        nonempty = row_sum > 0
        out[:, :, i] = torch.where(nonempty.unsqueeze(-1), acc / row_sum.clamp(min=1e-300).unsqueeze(-1), 0.0)
        lse[:, :, i] = torch.where(nonempty, row_max + torch.log(row_sum.clamp(min=1e-300)), float("-inf"))
    out = out.flatten(2, 3)[:, :, :q.shape[2]].to(q.dtype)
    lse = lse.flatten(2, 3)[:, :, :q.shape[2]]
    return out, lse


def _backward(q, k, v, lse, grad_out, delta, plan: _Plan, scale: float):
    work = _compute_dtype(q.dtype)
    bq, bk = plan.block_q, plan.block_k
    q_blocks = _pad_blocks(q, plan.n_q * bq, bq)
    k_blocks = _pad_blocks(k, plan.n_k * bk, bk)
    v_blocks = _pad_blocks(v, plan.n_k * bk, bk)
    do_blocks = _pad_blocks(grad_out, plan.n_q * bq, bq)
    lse_blocks = torch.nn.functional.pad(lse, (0, plan.n_q * bq - lse.shape[2]), value=float("-inf"))
    lse_blocks = lse_blocks.view(lse.shape[0], lse.shape[1], plan.n_q, bq).to(work)
    delta = torch.nn.functional.pad(delta.to(work), (0, plan.n_q * bq - delta.shape[2])).view_as(lse_blocks)
    batch, heads_kv = k.shape[0], k.shape[1]
    dq = torch.zeros(q_blocks.shape, dtype=work, device=q.device)
    dk = torch.zeros(batch * heads_kv * plan.n_k, bk, k.shape[3], dtype=work, device=q.device)
    dv = torch.zeros(batch * heads_kv * plan.n_k, bk, v.shape[3], dtype=work, device=q.device)
    for i in range(plan.n_q):
        qi, doi = q_blocks[:, :, i].to(work), do_blocks[:, :, i].to(work)
        lse_i = lse_blocks[:, :, i]
        safe_lse = torch.where(torch.isinf(lse_i), 0.0, lse_i).unsqueeze(-1)
        for ids, mask in plan.slots(i):
            kt = plan.gather(k_blocks, ids).to(work)
            vt = plan.gather(v_blocks, ids).to(work)
            scores = torch.einsum("bhqd,bhckd->bhqck", qi, kt) * scale
            probs = torch.exp(scores.flatten(3) - safe_lse) * mask.flatten(3)
            dp = torch.einsum("bhqd,bhnd->bhqn", doi, vt.flatten(2, 3))
            ds = probs * (dp - delta[:, :, i].unsqueeze(-1)) * scale
            dq[:, :, i] += torch.einsum("bhqn,bhnd->bhqd", ds, kt.flatten(2, 3))
            dk_tiles = torch.einsum("bhqn,bhqd->bhnd", ds, qi).view(*ids.shape, bk, -1)
            dv_tiles = torch.einsum("bhqn,bhqd->bhnd", probs, doi).view(*ids.shape, bk, -1)
            flat = ((plan.b * heads_kv + plan.h_kv) * plan.n_k + ids).flatten()
            dk.index_add_(0, flat, dk_tiles.reshape(-1, bk, dk.shape[2]))
            dv.index_add_(0, flat, dv_tiles.reshape(-1, bk, dv.shape[2]))
    dq = dq.flatten(2, 3)[:, :, :q.shape[2]]
    dk = dk.view(batch, heads_kv, plan.n_k * bk, -1)[:, :, :k.shape[2]]
    dv = dv.view(batch, heads_kv, plan.n_k * bk, -1)[:, :, :v.shape[2]]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def torch_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float):
    """`(out [B, Hq, Lq, D], lse [B, Hq, Lq] float32)`; inputs already validated."""
    plan = _Plan(layout, q.shape[0], q.shape[1], k.shape[1], q.device)
    out, lse = LayoutAttention.apply(q, k, v, plan, scale, _forward, _backward)
    return out, lse.float()


def available(device=None) -> str:
    return "available"


def can_run(q, k, v, layout) -> str:
    from blockattn.ops.dispatch import dtype_reason
    return dtype_reason(q, (torch.float64, torch.float32, torch.bfloat16, torch.float16), "torch")


def run(q, k, v, layout, *, scale):
    return torch_attention(q, k, v, layout, scale=scale)

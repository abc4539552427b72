"""AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity (Zhang et al., EMNLP 2025).

Rule: queries are processed in groups of `step` consecutive blocks of `block_size` rows. Each
query's anchor is its largest logit (q.k * scale, scale = 1/sqrt(d)) over the initial block of
keys and its own group's keys (causal): a near-maximum score obtained without scanning the context.
Each query block is then compressed to its mean query and mean anchor, and a past key j (after
the initial block, before the group) is a selected stripe of the group when, for some block of the
group, mean_q . k_j * scale + theta >= mean anchor. Every query then attends to the
initial block, the group's selected stripes (single key columns) and its own group's keys,
causally. The stripes are expressed as explicit per-tile column masks of the layout.

Reading of the official AnchorAttn code (its torch path `get_mask_block` and the Triton
`get_q_mask`): defaults theta=12, step=16, block_size=128; its released versions disagree on the
width of the initial window (one block vs one group), this class uses one block. Its released
`_prepare_anchor_inputs` multiplies theta by log2(e) before comparing it with log2-domain scores,
so theta is in units of q.k/sqrt(d), as here (this class took theta in log2 units before the
side-by-side check below). Its stripe scan for a group starting at s covers keys
[block_size, s - block_size): the last block before the group is never a stripe candidate (an
earlier version attends to that block densely as part of the local window; the released one, whose
initial window is one group, leaves it out of both from the third group on); here it is a candidate
like the other past keys.

Checks done: the token mask equals a float64 loop implementation of this rule in
tests/methods/test_anchor.py. Side by side with the official torch path `get_mask_block` (released
version, run on CPU outside the repo with `torch.cuda.synchronize` stubbed; its anchors input
computed by this rule in log2 units, `sm_scale` = log2(e)/sqrt(d) and `diff` = theta * log2(e) as
`_prepare_anchor_inputs` does): random inputs (1 sequence, 2 heads, dim 16, lengths 768 to 2048,
block 16/32, step 2 to 4, theta 2/4/8/12, 2 seeds, 1184 (head, group) stripe sets, 216k stripes):
identical stripe sets on the keys the official code scans; the only difference is the last block
before each group (above). The anchor computation (Triton only) was read, not run.

Causality: a group of `step` query blocks shares one stripe set, so in prefill the later tokens of
a group can change the stripes its earlier tokens attend to (never letting them see a later key),
as in the official code.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from blockattn.layout import BlockLayout
from blockattn.methods import register
from blockattn import _checks
from blockattn._checks import check_qk
from blockattn.methods._select import column_layout, cpu_has_bf16_units
from blockattn.methods.base import PrefillMethod

_ANCHOR_ROWS = 256  # query rows whose anchors are computed at once

@register("anchor")
@dataclasses.dataclass
class AnchorAttention(PrefillMethod):
    """Args:
        theta: allowed gap between a stripe's compressed score and the anchor, in units of q.k/sqrt(d)
            (the official code scales it by log2(e) for its log2-domain scores). Paper: 12.
        step: query blocks per group sharing one stripe set. Paper: 16.
        block_size: query block (and layout tile) size. Paper: 128.
    """

    within_block_lookahead = True  # a group of query blocks shares one stripe set
    theta: float = 12.0
    step: int = 16
    block_size: int = 128


    def __post_init__(self):
        _checks.number_arg("theta", self.theta, low=0.0)
        self.check_positive_ints("step", "block_size")

    def stripes(self, q: Tensor, k: Tensor) -> Tensor:
        """bool `[B, Hq, nQ, L]`: the key tokens each query block attends to (before causality)."""
        check_qk(q, k)
        batch, heads, length, dim = q.shape
        if k.shape[2] != length:
            raise ValueError(f"anchor attention selects for prefill: q_len ({length}) must equal k_len ({k.shape[2]})")
        block, group = self.block_size, self.block_size * self.step
        scale = dim ** -0.5
        heads_kv = k.shape[1]
        group_heads = heads // heads_kv
        keys = k.float()
        # scaled once; the query heads of a key head are stacked row-wise so each GEMM reads its keys once
        queries = (q.float() * scale).view(batch, heads_kv, group_heads, length, dim)
        # Anchors: the GEMMs find each query's best key in a low-precision copy (bf16 on CPUs with bf16
        # units), then its logit is recomputed from that key in fp32, so an anchor is exact unless two keys
        # tie within bf16 rounding (then it is the other key's exact logit, as close).
        dtype = torch.bfloat16 if q.device.type == "cpu" and cpu_has_bf16_units() else torch.float32
        keys_lp, queries_lp = keys.to(dtype), queries.to(dtype)
        n_q = -(-length // block)
        anchors = torch.empty(batch, heads_kv, group_heads, length, device=q.device)
        init = min(block, length)
        # one logits buffer for every band (fresh large allocations cost page faults each time)
        buffer = torch.empty(batch * heads * min(_ANCHOR_ROWS, length) * (init + min(group, length)), dtype=dtype,
                             device=q.device)
        for start in range(0, length, group):
            stop = min(length, start + group)
            # row bands: a band's rows never see the group's keys after the band (causal), so each band's
            # GEMM stops at its own end and only its last columns need the causal mask
            for a in range(start, stop, _ANCHOR_ROWS):
                b = min(stop, a + _ANCHOR_ROWS)
                first = max(start, init)
                positions = torch.cat([torch.arange(init, device=q.device),
                                       torch.arange(first, max(first, b), device=q.device)])
                window = torch.cat([keys_lp[:, :, :init], keys_lp[:, :, first:max(first, b)]], dim=2)
                window = window.view(batch * heads_kv, -1, dim)
                rows = queries_lp[:, :, :, a:b].reshape(batch * heads_kv, group_heads * (b - a), dim)
                logits = buffer[:batch * heads_kv * group_heads * (b - a) * len(positions)].view(
                    batch * heads_kv, group_heads * (b - a), len(positions))
                for i in range(batch * heads_kv):  # torch.mm on 2-D views: bmm copies the transposed keys
                    torch.mm(rows[i], window[i].t(), out=logits[i])
                logits = logits.view(batch, heads_kv, group_heads, b - a, -1)
                past = int((positions < a).sum())  # columns every row of the band sees
                future = positions[past:].view(1, -1) > torch.arange(a, b, device=q.device).view(-1, 1)
                logits[..., past:].masked_fill_(future, float("-inf"))
                best = positions[logits.max(-1).indices]  # [B, Hkv, g, b - a] (bf16 argmax is slow)
                chosen = keys.gather(2, best.view(batch, heads_kv, -1, 1).expand(-1, -1, -1, dim))
                anchors[..., a:b] = (queries[:, :, :, a:b] * chosen.view(batch, heads_kv, group_heads, b - a,
                                                                         dim)).sum(-1)
        anchors = anchors.view(batch, heads, length)
        pad = n_q * block - length
        rows = torch.nn.functional.pad(torch.ones(length, device=q.device), (0, pad)).view(n_q, block).sum(-1)
        mean_q = torch.nn.functional.pad(queries, (0, 0, 0, pad)).view(batch, heads_kv, group_heads, n_q, block,
                                                                      dim).sum(4) / rows.view(1, 1, 1, -1, 1)
        mean_anchor = torch.nn.functional.pad(anchors, (0, pad)).view(batch, heads, n_q, block).sum(-1) / rows
        compressed = (mean_q.view(batch, heads_kv, group_heads * n_q, dim) @ keys.transpose(-1, -2))
        hit = (compressed.view(batch, heads, n_q, length) + self.theta) >= mean_anchor.unsqueeze(-1)  # [B, H, nQ, L]
        n_groups = -(-n_q // self.step)
        hit = torch.nn.functional.pad(hit, (0, 0, 0, n_groups * self.step - n_q))
        hit = hit.view(batch, heads, n_groups, self.step, length).any(3)
        hit = hit.repeat_interleave(self.step, dim=2)[:, :, :n_q]
        group_start = (torch.arange(n_q, device=q.device) // self.step * group).view(-1, 1)
        key = torch.arange(length, device=q.device).view(1, -1)
        # stripes only between the initial block and the group; the group's own keys are always kept
        return (hit & (key >= init) & (key < group_start)) | (key < init) | (key >= group_start)

    def _select(self, q: Tensor, k: Tensor, *, causal: bool, grid, layer) -> BlockLayout:
        columns = self.stripes(q, k)
        return column_layout(columns, q_len=q.shape[2], block_q=self.block_size, block_k=self.block_size, causal=True)

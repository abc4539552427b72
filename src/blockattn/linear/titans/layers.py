"""Titans' three ways to combine the neural memory with attention, as causal `[B, L, d] -> [B, L, d]` modules.

Paper: Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), §4.
- MAC (memory as context): the sequence is cut into segments; each segment's queries first read
  the memory as it stood before the segment (h = M_{t−1}(q)); attention runs inside the segment
  over [persistent tokens ‖ h ‖ segment]; the memory then learns from the attention output y and
  the layer returns y ⊗ M_t(y).
- MAG (memory as gate): on x̃ = [persistent ‖ x], sliding-window attention (every row also sees
  the persistent tokens, the paper's SW-Attn*) and the memory run side by side and the memory
  branch gates the attention branch: o = SWA*(x̃) ⊗ σ(M(x̃)) (§4.2).
- MAL (memory as layer): the memory layer runs first on x̃ = [persistent ‖ x] and sliding-window
  attention on its output (§4.3).
The persistent rows are dropped from the output. `residual_norm=True` gives the memory a residual
and LayerNorm (see `titans/naive.py`); `paper_qkv=True` gives the memory branch §4.4's SiLU q, k, v
with a causal depthwise convolution (width 4) after each projection (in MAC, the convolution
restarts at every segment's attention output).
All attention goes through the engine (`blockattn.attention` on a layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import blockattn
from blockattn.layout import BlockLayout
from blockattn.linear.miras.chunk import memory_chunk
from blockattn.linear.miras.layer import MemoryMixer
from blockattn.linear.miras.parts import unflatten
from blockattn.linear.titans.naive import Titans


class NeuralMemory(MemoryMixer):
    """Titans' long-term memory as a mixer (θ, η, α gates from x; learned initial memory per head)."""

    def __init__(self, d_model: int, *, heads: int = 1, chunk_size: int = 16, expansion: int = 2,
                 residual_norm: bool = False, paper_qkv: bool = False):
        super().__init__(d_model, Titans(expansion, residual_norm).parts, heads=heads, chunk_size=chunk_size,
                         silu=paper_qkv, short_conv=4 if paper_qkv else 0)


class _SlidingAttention(nn.Module):
    """Causal sliding-window attention; the first `sink` keys are seen by every row (persistent tokens)."""

    def __init__(self, d_model: int, heads: int, window: int, sink: int = 0):
        super().__init__()
        self.heads, self.window, self.sink = heads, window, sink
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def layout(self, length: int) -> BlockLayout:
        if self.sink:
            return blockattn.patterns.streaming(length, sink=self.sink, window=self.window, block_q=16, block_k=16)
        return blockattn.patterns.sliding_window(length, window=self.window, block_q=16, block_k=16)

    def forward(self, x):
        batch, length, d_model = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = blockattn.attention(q, k, v, self.layout(length))
        return self.out(out.transpose(1, 2).reshape(batch, length, d_model))


def _persistent(count: int, d_model: int) -> nn.Parameter:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"persistent must be an int >= 0 (learned tokens prepended to the input), got {count!r}")
    return nn.Parameter(torch.randn(count, d_model) * d_model ** -0.5)


class TitansMAG(nn.Module):
    def __init__(self, d_model: int, *, heads: int = 1, window: int = 64, chunk_size: int = 16, expansion: int = 2,
                 persistent: int = 4, residual_norm: bool = False, paper_qkv: bool = False):
        super().__init__()
        self.persistent = _persistent(persistent, d_model)
        self.attention = _SlidingAttention(d_model, heads, window, sink=persistent)
        self.memory = NeuralMemory(d_model, heads=heads, chunk_size=chunk_size, expansion=expansion,
                                   residual_norm=residual_norm, paper_qkv=paper_qkv)
        self.norm_attention, self.norm_memory = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x):
        p = len(self.persistent)
        x = torch.cat([self.persistent.expand(x.shape[0], p, x.shape[2]), x], dim=1)
        out = self.norm_attention(self.attention(x)) * torch.sigmoid(self.norm_memory(self.memory(x)))
        return out[:, p:]


class TitansMAL(nn.Module):
    def __init__(self, d_model: int, *, heads: int = 1, window: int = 64, chunk_size: int = 16, expansion: int = 2,
                 persistent: int = 4, residual_norm: bool = False, paper_qkv: bool = False):
        super().__init__()
        self.persistent = _persistent(persistent, d_model)
        self.memory = NeuralMemory(d_model, heads=heads, chunk_size=chunk_size, expansion=expansion,
                                   residual_norm=residual_norm, paper_qkv=paper_qkv)
        self.attention = _SlidingAttention(d_model, heads, window)

    def forward(self, x):
        p = len(self.persistent)
        x = torch.cat([self.persistent.expand(x.shape[0], p, x.shape[2]), x], dim=1)
        return self.attention(self.memory(x))[:, p:]


class TitansMAC(nn.Module):
    """Memory as context; `segment` tokens per attention segment (= the memory's chunk size)."""

    def __init__(self, d_model: int, *, heads: int = 1, segment: int = 16, persistent: int = 4, expansion: int = 2,
                 residual_norm: bool = False, paper_qkv: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads, self.segment, self.persistent_count = heads, segment, persistent
        self.memory = NeuralMemory(d_model, heads=heads, chunk_size=segment, expansion=expansion,
                                   residual_norm=residual_norm, paper_qkv=paper_qkv)
        self.persistent = _persistent(persistent, d_model)
        # only the projections are used: the segment mask below replaces the window
        self.attention = _SlidingAttention(d_model, heads, window=2 * segment + persistent)
        self.layout = BlockLayout.from_token_mask(self._context_mask(), block_q=16, block_k=16)

    def _context_mask(self) -> torch.Tensor:
        """[persistent ‖ h ‖ segment] rows: every row sees the persistent tokens, then h and segment up to its position."""
        p, s = self.persistent_count, self.segment
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        mask = torch.zeros(p + 2 * s, p + 2 * s, dtype=torch.bool)
        mask[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
        mask[p:, :p] = True
        for rows in (slice(p, p + s), slice(p + s, p + 2 * s)):
            mask[rows, p:p + s] = causal
        mask[p + s:, p + s:] = causal
        return mask[None, None]

    def _read(self, accum, queries):
        """M_{t−1}(q) with the weights the memory held before this segment (no update)."""
        mem = self.memory
        shapes = mem.parts.memory.shapes(mem.head_dim, mem.head_dim)
        weights = unflatten(mem.parts.retention.weights(accum, shapes), shapes)
        return mem.parts.memory.forward([w.unsqueeze(1) for w in weights], queries)

    def forward(self, x):
        batch, length, d_model = x.shape
        seg, p, mem = self.segment, self.persistent_count, self.memory
        pad = (-length) % seg
        x = F.pad(x, (0, 0, 0, pad))
        total = length + pad
        count = total // seg
        heads, dh = self.heads, mem.head_dim
        segments = x.view(batch, count, seg, d_model)
        # h for every segment needs the memory state before it, so the segments run in order.
        queries = mem.project(x)[0].view(batch, heads, count, seg, dh)
        state, outs = None, []
        for i in range(count):
            seg_x = segments[:, i]
            q_mem = queries[:, :, i].reshape(batch * heads, seg, dh)
            accum = (mem.init.expand(batch, heads, -1).reshape(batch * heads, -1) if state is None else state.accum)
            h = self._read(accum, q_mem).view(batch, heads, seg, dh).transpose(1, 2).reshape(batch, seg, d_model)
            context = torch.cat([self.persistent.expand(batch, p, d_model), h, seg_x], dim=1)
            cq, ck, cv = self.attention.qkv(context).view(batch, p + 2 * seg, 3, heads, dh).permute(2, 0, 3, 1, 4)
            attended = blockattn.attention(cq, ck, cv, self.layout).transpose(1, 2).reshape(batch, p + 2 * seg, d_model)
            y = self.attention.out(attended[:, p + seg:])
            read, state = self._memory_pass(y, state)
            outs.append(y * torch.sigmoid(read))
        return torch.cat(outs, dim=1)[:, :length]

    def _memory_pass(self, y, state):
        """Update the memory with the segment's attention output and read it back, M_t(y)."""
        mem = self.memory
        batch, seg, d_model = y.shape
        q, k, v = mem.project(y)
        gates = mem.gates(y).view(batch, seg, -1, self.heads).permute(2, 0, 3, 1)
        out, state = memory_chunk(q, k, v, parts=mem.parts, init=mem.init if state is None else None,
                                  lr=mem.lr_max * torch.sigmoid(gates[0]), decay=torch.sigmoid(gates[1]).clamp(min=1e-4),
                                  momentum=torch.sigmoid(gates[2]).clamp(1e-4, 0.999), chunk_size=seg,
                                  initial_state=state, output_state=True)
        return mem.out(out.transpose(1, 2).reshape(batch, seg, d_model)), state

"""DMA: trainable dynamic mask sparse attention with a value-derived, query-independent key bias.

Shi et al., "Trainable Dynamic Mask Sparse Attention" (arXiv 2508.02124; code SmallDoges/flash-dmattn,
now flash-algo/flash-sparse-attn, `examples/modeling/modeling_doge.py`). For each KV head h and key j a
bias `b[h, j] = A[h] * softplus(W_dt · [v_j of all KV heads])[h]` (the current code; the paper's form
is `exp(...)` of that, `form="exp"`; both keep the same keys) is added to the logits, and each query
keeps only its `window` keys with the largest bias among the causally allowed ones (all of them while
`i + 1 <= window`); the selection runs on the detached bias, so A and W_dt learn through the kept
logits. Defaults: window 2048, A ~ N(0, 0.02), no dt bias.

On the engine: the bias is folded into one extra channel (`q' = [c q, 1]`, `k' = [k, b]`, so
`q'·k' = c q·k + b` and db comes out of dk'), and the keep rule becomes a token mask
`j <= i and b_j >= tau_i` (tau_i the window-th largest bias of keys 0..i), built query block by query
block into a `BlockLayout` whose partial tiles carry bit masks. Tiles with no kept key are skipped.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import blockattn
from blockattn._checks import check_qkv_tensors
from blockattn.layout import BlockLayout

__all__ = ["DMAAttention", "keep_thresholds"]

FORMS = ("linear", "exp")
_ROWS = 64  # query rows whose thresholds are computed at once: O(_ROWS * L) memory


def _check_positive(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def keep_thresholds(bias: Tensor, window: int) -> Tensor:
    """tau `[B, H, L]`: the `window`-th largest of `bias[..., :i+1]` for row i (-inf while
    `i + 1 <= window`, so those rows keep every earlier key), from a detached `bias [B, H, L]`."""
    bias = bias.detach()
    length = bias.shape[-1]
    tau = torch.full_like(bias, float("-inf"))
    for start in range(window, length, _ROWS):
        stop = min(length, start + _ROWS)
        rows = torch.arange(start, stop, device=bias.device).view(-1, 1)
        future = torch.arange(stop, device=bias.device).view(1, -1) > rows
        prefix = bias[..., :stop].unsqueeze(-2).masked_fill(future, float("-inf"))
        tau[..., start:stop] = prefix.topk(window, dim=-1).values[..., -1]
    return tau


class DMAAttention(nn.Module):
    """Causal self-attention with DMA's content-aware key bias and top-`window` keep rule.

    `forward(q, k, v)`: q `[B, Hq, L, D]`, k, v `[B, Hkv, L, D]` (q, k already rotated) ->
    `[B, Hq, L, D]`; `select(v)` returns the `(layout, bias [B, Hkv, L])` it attends with.
    """

    def __init__(self, heads_kv: int, head_dim: int, *, window: int = 2048, form: str = "linear",
                 block_size: int = 64, backend: str = "auto"):
        super().__init__()
        self.heads_kv, self.head_dim = _check_positive("heads_kv", heads_kv), _check_positive("head_dim", head_dim)
        self.window = _check_positive("window", window)
        self.block_size = _check_positive("block_size", block_size)
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form, self.backend = form, backend
        self.dt_proj = nn.Linear(heads_kv * head_dim, heads_kv, bias=False)
        self.A = nn.Parameter(torch.randn(heads_kv) * 0.02)

    def key_bias(self, v: Tensor) -> Tensor:
        """`[B, Hkv, L]` bias from the values `[B, Hkv, L, D]` (all heads' values of a token feed each head)."""
        batch, heads, length, dim = v.shape
        z = self.dt_proj(v.transpose(1, 2).reshape(batch, length, heads * dim)).transpose(1, 2)
        bias = self.A.view(1, -1, 1) * nn.functional.softplus(z)
        return torch.exp(bias) if self.form == "exp" else bias

    def select(self, v: Tensor, heads_q: int | None = None) -> tuple[BlockLayout, Tensor]:
        """The causal-aware top-window layout (per query head, shared inside a GQA group) and the bias."""
        batch, heads, length, _ = v.shape
        heads_q = heads if heads_q is None else heads_q
        bias = self.key_bias(v)
        block = min(self.block_size, length)
        if length <= self.window:  # nothing to drop: plain causal attention plus the bias
            layout = BlockLayout.from_dense(torch.ones(1, 1, -(-length // block), -(-length // block),
                                                       dtype=torch.bool, device=v.device),
                                            q_len=length, k_len=length, block_q=block, block_k=block, causal=True)
            return layout, bias
        tau = keep_thresholds(bias, self.window).cpu()
        kept = bias.detach().cpu()
        group = heads_q // heads

        def mask_mod(b, h, i, j):
            return (j <= i) & (kept[b, h // group, j] >= tau[b, h // group, i])

        layout = BlockLayout.from_token_mask(mask_mod, q_len=length, k_len=length, block_q=block, block_k=block,
                                             batch=batch, heads=heads_q)
        return layout.to(v.device), bias

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        check_qkv_tensors(q, k, v)
        if k.shape != v.shape or q.shape[2] != k.shape[2] or k.shape[1] != self.heads_kv or \
                k.shape[3] != self.head_dim or q.shape[1] % self.heads_kv or q.shape[0] != k.shape[0]:
            raise ValueError(f"expected q [B, Hq, L, {self.head_dim}] and k, v [B, {self.heads_kv}, L, "
                             f"{self.head_dim}] with Hq a multiple of {self.heads_kv}, got {list(q.shape)}, "
                             f"{list(k.shape)}, {list(v.shape)}")
        layout, bias = self.select(v, q.shape[1])
        scale = self.head_dim ** -0.5
        q_fold = torch.cat([q * scale, torch.ones_like(q[..., :1])], -1)
        k_fold = torch.cat([k, bias.unsqueeze(-1).to(k.dtype)], -1)
        v_fold = nn.functional.pad(v, (0, 1))
        return blockattn.attention(q_fold, k_fold, v_fold, layout, scale=1.0, backend=self.backend)[..., :-1]

"""Quality of a block-selection method on given q, k, v, against dense (causal) attention.

Measures, per call: attention-mass recall (the share of each query's dense softmax mass that falls
inside the selected layout, averaged over queries and heads), output relative error
(||out - dense|| / ||dense||, Frobenius), density (tiles against the causal tiles, and token pairs),
and selection time as a fraction of dense attention time on the same backend. Scores are streamed
a band of query blocks at a time: no `[L, L]` tensor.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor

import blockattn
from blockattn.layout import BlockLayout

_BAND_TOKENS = 512  # query rows scored at once


@dataclasses.dataclass
class Quality:
    method: str
    length: int
    recall: float
    output_error: float
    density: float          # computed tiles / causal tiles
    token_density: float    # allowed token pairs / all pairs
    select_ms: float
    attend_ms: float
    dense_ms: float

    @property
    def overhead(self) -> float:
        """Selection time as a fraction of dense attention time."""
        return self.select_ms / self.dense_ms

    @property
    def speedup(self) -> float:
        """Dense attention time / (selection + sparse attention) time."""
        return self.dense_ms / (self.select_ms + self.attend_ms)


def attention_recall(q: Tensor, k: Tensor, layout: BlockLayout, *, scale: float | None = None,
                     causal: bool = True) -> float:
    """Mean over queries and heads of the dense softmax mass inside `layout`'s token mask."""
    batch, heads, q_len, dim = q.shape
    group = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    keys = k.float().repeat_interleave(group, dim=1) if group > 1 else k.float()
    offset = k.shape[2] - q_len
    blocks_per_band = max(1, _BAND_TOKENS // layout.block_q)
    total, count = 0.0, 0
    for first in range(0, layout.num_q_blocks, blocks_per_band):
        stop = min(layout.num_q_blocks, first + blocks_per_band)
        rows = slice(first * layout.block_q, min(q_len, stop * layout.block_q))
        scores = (q[:, :, rows].float() @ keys.transpose(-1, -2)) * scale
        if causal:
            i = torch.arange(rows.start, rows.stop).view(-1, 1) + offset
            scores = scores.masked_fill(torch.arange(k.shape[2]).view(1, -1) > i, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        inside = (probs * layout.token_mask_rows(first, stop)).sum(-1)
        total += float(inside.sum())
        count += inside.numel()
    return total / count


def measure(method, q: Tensor, k: Tensor, v: Tensor, *, name: str | None = None, backend: str = "auto",
            repeats: int = 2, layer: int | None = None) -> Quality:
    """Quality of `method` (a Method object or a registered name) on one attention call (of model layer
    `layer`, for methods calibrated per layer)."""
    if isinstance(method, str):
        method = blockattn.methods.get(method)
    dense_layout = blockattn.patterns.causal(q.shape[2], k.shape[2])

    def best(fn):
        times = []
        result = None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1e3)
        return result, min(times)

    with torch.no_grad():
        layout, select_ms = best(lambda: method.select(q, k, causal=True, layer=layer))
        out, attend_ms = best(lambda: blockattn.attention(q, k, v, layout, backend=backend))
        dense, dense_ms = best(lambda: blockattn.attention(q, k, v, dense_layout, backend=backend))
        error = float((out.float() - dense.float()).norm() / dense.float().norm())
        recall = attention_recall(q, k, layout)
    return Quality(name or getattr(method, "name", type(method).__name__), q.shape[2], recall, error,
                   layout.density("causal"), layout.token_density(), select_ms, attend_ms, dense_ms)


def skip_reason(method, q: Tensor, k: Tensor, *, layer: int | None = None) -> str | None:
    """Why `method` cannot select on plain q/k of model layer `layer` (e.g. a video method that needs
    `grid=(T, H, W)`), tried on the first 256 tokens; None when it can. Errors elsewhere are not hidden."""
    if isinstance(method, str):
        method = blockattn.methods.get(method)
    n = min(256, q.shape[2])
    try:
        method.select(q[:, :, :n], k[:, :, :n], causal=True, layer=layer)
    except (TypeError, ValueError) as error:
        return str(error)
    return None


def measure_layers(method, captured: dict, *, name: str | None = None, backend: str = "auto",
                   repeats: int = 2) -> Quality:
    """`measure` on each captured layer `{layer: (q, k, v)}`, averaged over the layers."""
    per_layer = [measure(method, *qkv, name=name, backend=backend, repeats=repeats, layer=layer)
                 for layer, qkv in captured.items()]
    mean = {f.name: sum(getattr(r, f.name) for r in per_layer) / len(per_layer)
            for f in dataclasses.fields(Quality) if f.name not in ("method", "length")}
    return Quality(per_layer[0].method, per_layer[0].length, **mean)


def format_table(rows: list[Quality]) -> str:
    lines = ["| method | L | recall | output rel. error | tiles / causal tiles | selection ms | "
             "selection / dense attention | attention ms | dense ms | speedup (select+attend vs dense) |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r.method} | {r.length} | {r.recall:.4f} | {r.output_error:.4f} | {r.density:.3f} | "
                     f"{r.select_ms:.1f} | {r.overhead:.2f} | {r.attend_ms:.1f} | {r.dense_ms:.1f} | "
                     f"{r.speedup:.2f}x |")
    return "\n".join(lines)

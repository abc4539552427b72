"""The shape every KV policy has (kvpress's, with real per-head budgets).

A policy is a dataclass of its paper's hyperparameters. After the prefill attention of each layer it is
handed that layer's post-RoPE `query [B, Hq, n, D]` and `key, value [B, Hkv, n, D]` and returns, per KV
head, the sorted positions to keep (`Selection`); heads may keep different counts. While decoding, the
new tokens are appended to every head, `attend` runs the engine over each head's buffer, and
`after_attend` may evict (a bounded cache). `ratio` is the fraction of the cache removed (kvpress's
`compression_ratio`); sinks and windows count inside the budget.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import torch
from torch import Tensor

import blockattn


@dataclasses.dataclass
class Selection:
    """Per KV head: `keep[h]` sorted positions `[B, n_h]`; `compensate[h]` folds the dropped tokens into
    one slot (RazorAttention); `capacity[h]` bounds the head while decoding (None: it grows)."""
    keep: list[Tensor]
    compensate: list[bool] | None = None
    capacity: list[int | None] | None = None


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a float in [0, 1) (the fraction of the cache removed), got {ratio!r}")
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1) (the fraction of the cache removed), got {ratio}")
    return float(ratio)


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def budget(n: int, ratio: float) -> int:
    """Tokens kept out of `n` at `ratio` (kvpress: int(n·(1 − ratio)), at least one)."""
    return max(1, int(n * (1 - ratio)))


@functools.lru_cache(maxsize=256)
def _causal(q_len: int, k_len: int):
    return blockattn.patterns.causal(q_len, k_len)


def attend_head(query: Tensor, key: Tensor, value: Tensor, scale: float, backend: str = "auto",
                comp: tuple[Tensor, Tensor, Tensor] | None = None, return_lse: bool = False):
    """The engine over one KV head's buffer: `query [B, G, Lq, D]` (its group), `key, value [B, n, D]`,
    the queries being the last `Lq` tokens of the buffer. A compensation slot `(k̂ [B, D], v̂ [B, D],
    N_d [B])` enters with logit q·k̂·scale + log N_d (RazorAttention eq. 5), merged through the lse."""
    k, v = key.unsqueeze(1), value.unsqueeze(1)
    layout = _causal(query.shape[2], key.shape[1])
    if comp is None:
        return blockattn.attention(query, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)
    if return_lse:
        raise ValueError("attend_head: return_lse with a compensation slot is not supported")
    out, lse = blockattn.attention(query, k, v, layout, scale=scale, return_lse=True, backend=backend)
    comp_k, comp_v, count = comp
    logit = torch.einsum("bgqd,bd->bgq", query.float(), comp_k.float()) * scale + count.float().log()[:, None, None]
    top = torch.maximum(lse, logit)
    w_main, w_comp = (lse - top).exp(), (logit - top).exp()
    mixed = (w_main.unsqueeze(-1) * out.float() + w_comp.unsqueeze(-1) * comp_v.float()[:, None, None]) \
        / (w_main + w_comp).unsqueeze(-1)
    return mixed.to(query.dtype)


def head_probs(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """Attention probabilities of a few queries `[B, G, Lq, D]` over one head's buffer `[B, n, D]`, causal
    bottom-right aligned: `[B, G, Lq, n]` (Lq is a decode chunk, so this is O(n))."""
    logits = torch.einsum("bgqd,bnd->bgqn", query.float(), key.float()) * scale
    q_len, n = query.shape[2], key.shape[1]
    if q_len > 1:
        future = torch.arange(n, device=query.device) > (n - q_len + torch.arange(q_len, device=query.device))[:, None]
        logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(-1)


@dataclasses.dataclass
class Policy:
    """Base class of a KV policy (see the module docstring). Subclasses override `select`, and where their
    paper decides during decoding, `attend` / `after_attend`."""

    name = "policy"        # registry name, set by @register
    compresses = True      # False for policies that keep the whole cache (TidalDecode, ACT)

    def setup(self, model, runtime) -> None:
        """Called once by `hf.patch(kv=...)` (a probe pass, a plan file)."""

    def select(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Selection:
        raise NotImplementedError

    def prefill_attend(self, cache, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float,
                       backend: str) -> Tensor | None:
        """A prefill attention of the policy's own `[B, Hq, n, D]`, or None: the patch's method runs."""
        return None

    def attend(self, cache, state, layer: int, query: Tensor, scale: float, backend: str) -> Tensor:
        """Decode step over every KV head's buffer (the new tokens already appended): `[B, Hq, Lq, D]`."""
        heads = len(state.head_keys)
        group = query.shape[1] // heads
        outs = []
        for h in range(heads):
            comp = None if state.comp_keys[h] is None else (state.comp_keys[h], state.comp_values[h],
                                                            state.comp_counts[h])
            outs.append(attend_head(query[:, h * group:(h + 1) * group], state.head_keys[h],
                                    state.head_values[h], scale, backend, comp))
        return torch.cat(outs, dim=1)

    def after_attend(self, cache, state, layer: int, query: Tensor, scale: float) -> None:
        """Evict from `state` after a decode step (default: nothing; the buffers grow)."""

    def params(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ScorerPolicy(Policy):
    """kvpress's ScorerPress: `score(...) -> [B, Hkv, n]`, keep the top int(n·(1 − ratio)) per KV head,
    in position order."""

    ratio: float = 0.0

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio)

    def score(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        raise NotImplementedError

    def check_budget(self, n: int, kept: int) -> None:
        """Raise if `kept` tokens cannot hold what the policy always keeps (sinks, windows)."""

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        kept = budget(n, self.ratio)
        if kept >= n:
            index = torch.arange(n, device=key.device).expand(batch, n)
            return Selection([index] * heads)
        self.check_budget(n, kept)
        scores = self.score(layer, query, key, value, scale)
        index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values  # position order, as RoPE'd keys expect
        return Selection([index[:, h] for h in range(heads)])


def group_mean(scores: Tensor, kv_heads: int) -> Tensor:
    """`[B, Hq, n]` query-head scores -> `[B, Hkv, n]`, mean over each contiguous GQA group (kvpress)."""
    b, hq, n = scores.shape
    return scores.view(b, kv_heads, hq // kv_heads, n).mean(2)


def window_probs(query: Tensor, key: Tensor, window: int, scale: float) -> Tensor:
    """Softmax attention of the last `window` queries over all keys, causal: `[B, Hq, window, n]` in float32
    (O(window·n))."""
    b, hq, _, d = query.shape
    n = key.shape[2]
    group = hq // key.shape[1]
    q = query[:, :, -window:].float().view(b, key.shape[1], group, window, d)
    logits = torch.einsum("bhgqd,bhnd->bhgqn", q, key.float()) * scale
    rows = torch.arange(n - window, n, device=query.device)[:, None]
    logits = logits.masked_fill(torch.arange(n, device=query.device) > rows, float("-inf"))
    return logits.softmax(-1).view(b, hq, window, n)


__all__ = ["Policy", "ScorerPolicy", "Selection", "attend_head", "budget", "check_int", "check_ratio",
           "group_mean", "head_probs", "window_probs"]

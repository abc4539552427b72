"""Selection rules shared by block-selection methods: cumulative-threshold and top-k over block scores,
and mapping key heads to the query heads they serve (GQA)."""
from __future__ import annotations

import torch
from torch import Tensor


def expand_kv_heads(k: Tensor, heads_q: int) -> Tensor:
    """`[B, Hkv, L, D]` -> `[B, Hq, L, D]` view-expanded (no copy): each key head serves its query group."""
    batch, heads_kv, length, dim = k.shape
    if heads_q % heads_kv:
        raise ValueError(f"query heads ({heads_q}) must be a multiple of key heads ({heads_kv})")
    group = heads_q // heads_kv
    return k[:, :, None].expand(batch, heads_kv, group, length, dim).reshape(batch, heads_q, length, dim)


def check_qk(q: Tensor, k: Tensor) -> None:
    """The input rule every selector shares: q `[B, Hq, Lq, D]`, k `[B, Hkv, Lk, D]`, `Hq % Hkv == 0`."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, H, L, D]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must share batch size and head dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key heads ({k.shape[1]})")


def cumulative_threshold(scores: Tensor, threshold: float, *, forced: Tensor | None = None) -> Tensor:
    """bool mask of the fewest blocks per row whose scores sum to >= `threshold` x the row total.

    scores: `[..., nK]` non-negative (blocks that may not be chosen must be 0); forced: bool `[..., nK]`
    blocks that are always kept (they are counted first). Ties are broken by block index.
    """
    if forced is not None:
        # forced blocks sort first; their mass counts toward the threshold
        keyed = torch.where(forced, torch.full_like(scores, float("inf")), scores)
    else:
        keyed = scores
    order = keyed.argsort(dim=-1, descending=True, stable=True)
    sorted_scores = scores.gather(-1, order)
    total = scores.sum(-1, keepdim=True)
    before = sorted_scores.cumsum(-1) - sorted_scores  # mass of the blocks ranked ahead of each block
    keep_sorted = (before < threshold * total) & (sorted_scores > 0)
    if forced is not None:
        keep_sorted = keep_sorted | forced.gather(-1, order)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_k(scores: Tensor, k: int, *, allowed: Tensor, forced: Tensor | None = None) -> Tensor:
    """bool mask of the `k` highest-scoring allowed blocks per row (fewer where fewer are allowed);
    `forced` blocks are always kept and count toward `k`."""
    keyed = scores.masked_fill(~allowed, float("-inf"))
    if forced is not None:
        keyed = keyed.masked_fill(forced, float("inf"))
    k = min(k, scores.shape[-1])
    chosen = keyed.topk(k, dim=-1).indices
    mask = torch.zeros_like(allowed).scatter(-1, chosen, True)
    return mask & allowed

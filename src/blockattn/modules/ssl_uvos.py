"""SSL-UVOS ("Betrayed by Attention"): one spatio-temporal block on frozen features, and clustering of
its attention into object masks.

Ding, Qian, Xu, Lin, Xiong, "Betrayed by Attention: A Simple yet Effective Approach for
Self-supervised Video Object Segmentation" (ECCV 2024, arXiv 2311.17893); official code
shvdiwnkozbw/SSL-UVOS (`src/model/model_cluster.py`, `src/model/attention.py`, `src/eval_oneshot.py`).

- `SpatioTemporalBlock`: a pre-LN ViT block (dim 384, 8 heads, qkv without bias, MLP ratio 4,
  GELU, proj/MLP dropout 0.1) over all T * (1 + HW) tokens of a clip (per frame the CLS token and
  the frozen DINO key features), no positional embedding; its attention runs through the block
  engine with a full layout. The paper's attention dropout (0.4) is not included (the engine
  computes the exact softmax). `attention_rows` returns head-averaged attention rows for chosen
  queries (what the training losses read), O(queries x L), never the L x L map.
- `key_frame_attention` (inference): after norm1 and the qkv projection, every pixel of every
  frame attends to the pixels of every `ratio`-th frame only (10 in the paper); per head softmax,
  heads averaged, gives each pixel a distribution over (T / ratio) * HW key pixels. These
  distributions are the clustering features (the method's output), computed query chunk by chunk.
- `hierarchical_cluster` (tau = 1.0): with the symmetric KL `D(p, q) = sum (p - q)(log p - log q)`,
  (1) inside windows of 3 frames each point becomes the normalised sum of its neighbours within
  tau, then a greedy pass (take an unassigned point, average all unassigned points within tau,
  mark them) gives the window's centroids; (2) the greedy pass over all centroids repeats until
  their count stops changing; (3) each pixel joins its nearest centroid: one mask per centroid.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import blockattn
from blockattn.modules._block_checks import check_positive_int, check_same_device_dtype, check_tensor
from blockattn.patterns import full

__all__ = ["SpatioTemporalBlock", "symmetric_kl", "hierarchical_cluster"]


class SpatioTemporalBlock(nn.Module):
    """Pre-LN transformer block over `[B, L, dim]` (L = T * (1 + HW) tokens of a clip)."""

    def __init__(self, dim: int = 384, heads: int = 8, *, mlp_ratio: float = 4.0, drop: float = 0.1,
                 backend: str = "auto"):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.heads = check_positive_int("heads", heads)
        if dim % heads:
            raise ValueError(f"heads must divide dim={dim}, got {heads}")
        self.backend, self.scale = backend, (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))
        self.drop = nn.Dropout(drop)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        return self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: Tensor) -> Tensor:
        check_tensor("x", x, 3, f"[B, L, D={self.dim}]", d2=self.dim)
        check_same_device_dtype(self, "x", x)
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        out = blockattn.attention(q, k, v, full(n), backend=self.backend).transpose(1, 2).reshape(b, n, self.dim)
        x = x + self.drop(self.proj(out))
        return x + self.mlp(self.norm2(x))

    def attention_rows(self, x: Tensor, queries: Tensor) -> Tensor:
        """Head-averaged attention probabilities of the query positions `queries` (long `[Q]`): `[B, Q, L]`."""
        check_tensor("x", x, 3, f"[B, L, D={self.dim}]", d2=self.dim)
        if not isinstance(queries, Tensor) or queries.dtype != torch.long or queries.dim() != 1:
            raise TypeError("queries must be a 1-dim long tensor of token positions")
        q, k, _ = self._qkv(x)
        return torch.softmax(q[:, :, queries] @ k.transpose(-1, -2) * self.scale, dim=-1).mean(1)

    def key_frame_attention(self, features: Tensor, ratio: int = 10, *, chunk: int = 4096) -> Tensor:
        """features `[T, HW, D]` (no CLS) -> `[T, HW, (T // ratio) * HW]`: each pixel's head-averaged
        attention over the pixels of frames 0, ratio, 2 ratio, ..."""
        check_tensor("features", features, 3, f"[T, HW, D={self.dim}]", d2=self.dim)
        check_positive_int("ratio", ratio)
        t, hw, _ = features.shape
        if ratio > t:
            raise ValueError(f"ratio must not exceed the number of frames {t}, got {ratio}")
        q, k, _ = self._qkv(features)                                             # [T, h, HW, d]
        keys = k[torch.arange(t // ratio, device=features.device) * ratio]       # [Tk, h, HW, d]
        keys = keys.permute(1, 0, 2, 3).reshape(self.heads, -1, k.shape[-1])     # [h, Tk*HW, d]
        queries = q.permute(1, 0, 2, 3).reshape(self.heads, t * hw, -1)          # [h, T*HW, d]
        rows = [torch.softmax(queries[:, i:i + chunk] @ keys.transpose(1, 2) * self.scale, -1).mean(0)
                for i in range(0, t * hw, chunk)]
        return torch.cat(rows).view(t, hw, -1)


def symmetric_kl(p: Tensor, q: Tensor) -> Tensor:
    """`[N, K]`, `[M, K]` distributions -> `[N, M]` with `sum_k (p - q)(log p - log q)`."""
    log_p, log_q = p.log(), q.log()
    self_terms = (p * log_p).sum(-1)[:, None] + (q * log_q).sum(-1)[None]
    return self_terms - p @ log_q.T - log_p @ q.T


def _greedy(points: Tensor, tau: float) -> Tensor:
    distance = symmetric_kl(points, points)
    distance.fill_diagonal_(0.0)   # rounding can leave D(p, p) slightly above a tau of 0
    free = torch.ones(len(points), dtype=torch.bool, device=points.device)
    centroids = []
    for i in range(len(points)):
        if free[i]:
            members = (distance[i] <= tau) & free
            centroids.append(points[members].mean(0))
            free &= ~members
    return torch.stack(centroids)


def hierarchical_cluster(attention: Tensor, tau: float = 1.0, *, window: int = 3, max_iter: int = 10_000) -> Tensor:
    """attention `[T, HW, K]` (rows are distributions) -> labels long `[T, HW]` (cluster ids 0..n-1)."""
    check_tensor("attention", attention, 3, "[T, HW, K]")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau < 0:
        raise ValueError(f"tau must be a non-negative number, got {tau!r}")
    check_positive_int("window", window)
    attention = attention / attention.sum(-1, keepdim=True)
    t, hw, k = attention.shape
    centroids = []
    for start in range(0, t, window):
        sample = attention[start:start + window].reshape(-1, k)
        near = symmetric_kl(sample, sample).fill_diagonal_(0.0) <= tau
        near = near.to(sample.dtype)
        smoothed = near @ sample
        centroids.append(_greedy(smoothed / smoothed.sum(-1, keepdim=True), tau))
    centroids = torch.cat(centroids)
    for _ in range(max_iter):
        merged = _greedy(centroids, tau)
        if len(merged) == len(centroids):
            break
        centroids = merged
    labels = symmetric_kl(centroids, attention.reshape(-1, k)).argmin(0)
    # renumber so that ids are 0..n-1 in order of first appearance and every id owns a pixel
    _, labels = torch.unique(labels, sorted=True, return_inverse=True)
    return labels.view(t, hw)

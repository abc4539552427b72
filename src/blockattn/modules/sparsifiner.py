"""Sparsifiner: instance-dependent sparse attention masks from a low-rank connectivity predictor.

Wei, Duke, Jiang, Aarabi, Taylor, Shkurti, "Sparsifiner: Learning Sparse Instance-Dependent
Attention for Efficient Vision Transformers" (CVPR 2023, arXiv 2303.13755; code lim142857/Sparsifiner,
`src/models/sparsifiner.py`). Per layer and head, q and k (`[N, d_h]`, token 0 the cls token) are cut to
`d_h / reduce_c` channels by linears shared across heads, the keys are projected down to
`n_down = N // reduce_n` tokens by a learned `[N, n_down]` matrix, and the coefficients
`softmax(q_c (k_c^T P) / sqrt(H))` (the code scales by the number of heads, not d_h) mix a second learned
basis `P_up^T` into a low-rank connectivity map `A_hat [N-1, N]` for the patch queries. Each patch query
keeps its `ceil(keep_rate * N)` keys of largest `A_hat` (the paper's 25 %); the cls query keeps every
key. Outside the reconstruction phase the basis is `|P_up|` thresholded at 0.02 and each row keeps its
top `coef_topk` coefficients (8 of 32 in the paper). The mask is detached: the predictor learns only by
attention reconstruction (phase 1: `0.01 * sum (A_hat - A_dense)^2` with the backbone frozen and
attending densely), then the backbone is fine-tuned through the fixed predictor's sparse masks (phase 2;
`sparsifiner_train.py` runs both).

On the engine: the top-k mask is cut into `block_size` tiles, each listed with its bit mask
(`BlockLayout.from_tile_masks`; empty tiles are dropped, full ones carry no mask), and attention runs
only over them, forward and backward. The predictor's `A_hat` is `[N-1, N]` by the paper's
construction (it is what the reconstruction loss compares), so it is meant for ViT-sized N.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import blockattn
from blockattn._checks import bool_arg, check_qkv_tensors, choice_arg, fraction_arg, int_arg, number_arg
from blockattn.layout import BlockLayout
from blockattn.patterns import full

__all__ = ["SparsifinerAttention", "SparsifinerPredictor", "masked_attention", "mask_layout"]

SCALES = ("heads", "channels")


def mask_layout(mask: Tensor, block_size: int = 16) -> BlockLayout:
    """The `BlockLayout` of a token mask `[B, H, N, N]` (True = attend), every tile listed with its bits."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor [B, H, N, N], got "
                        f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if mask.dim() != 4:
        raise ValueError(f"mask must have 4 dims [B, H, N, N], got shape {list(mask.shape)}")
    block_size = int_arg("block_size", block_size)
    batch, heads, q_len, k_len = mask.shape
    n_q, n_k = -(-q_len // block_size), -(-k_len // block_size)
    padded = nn.functional.pad(mask, (0, n_k * block_size - k_len, 0, n_q * block_size - q_len))
    tiles = padded.view(batch, heads, n_q, block_size, n_k, block_size).transpose(3, 4)
    index = [t.reshape(-1) for t in torch.meshgrid(*(torch.arange(n, device=mask.device)
                                                     for n in (batch, heads, n_q, n_k)), indexing="ij")]
    return BlockLayout.from_tile_masks(tuple(index), tiles.reshape(-1, block_size, block_size), q_len=q_len,
                                       k_len=k_len, block_q=block_size, block_k=block_size, batch=batch,
                                       heads=heads)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, block_size: int = 16,
                     backend: str = "auto") -> Tensor:
    """Softmax attention of q, k, v `[B, H, N, D]` over the token mask `[B, H, N, N]`, through the engine."""
    check_qkv_tensors(q, k, v)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dim() != 4 or tuple(mask.shape[2:]) != (q.shape[2], k.shape[2]):
        raise ValueError(f"mask must be a bool tensor [B|1, H|1, {q.shape[2]}, {k.shape[2]}] for q {list(q.shape)} "
                         f"and k {list(k.shape)}, got {list(mask.shape)}")
    return blockattn.attention(q, k, v, mask_layout(mask, block_size).to(q.device), backend=backend)


class SparsifinerPredictor(nn.Module):
    """The low-rank connectivity predictor of one layer (weights shared across its heads).

    `approx(q, k, sparse)` -> `A_hat [B, H, N-1, N]`; `forward(q, k)` -> bool mask `[B, H, N, N]`:
    each patch row keeps exactly `ceil(keep_rate * N)` keys, the cls row (token 0) all of them.
    """

    def __init__(self, head_dim: int, num_tokens: int, heads: int, *, keep_rate: float = 0.25, reduce_n: int = 6,
                 reduce_c: int = 2, basis_threshold: float = 0.02, coef_topk: int = 8, scale: str = "heads"):
        super().__init__()
        self.head_dim, self.num_tokens = int_arg("head_dim", head_dim), int_arg("num_tokens", num_tokens, minimum=2)
        self.heads = int_arg("heads", heads)
        self.keep_rate = fraction_arg("keep_rate", keep_rate)
        reduce_n, reduce_c = int_arg("reduce_n", reduce_n), int_arg("reduce_c", reduce_c)
        if head_dim // reduce_c < 1 or num_tokens // reduce_n < 1:
            raise ValueError(f"reduce_c ({reduce_c}) and reduce_n ({reduce_n}) leave no channel or token of "
                             f"head_dim {head_dim} and num_tokens {num_tokens}")
        self.basis_threshold = number_arg("basis_threshold", basis_threshold, low=0.0)
        self.reduced_n = num_tokens // reduce_n
        self.coef_topk = min(int_arg("coef_topk", coef_topk), self.reduced_n)
        self.budget = math.ceil(self.keep_rate * num_tokens)
        # the official code scales the cheap logits by heads^-1/2, a quirk kept as the default; "channels"
        # is the usual c^-1/2 of the reduced channels
        self.scale = (heads if choice_arg("scale", scale, SCALES) == "heads" else head_dim // reduce_c) ** -0.5
        self.proj_q = nn.Linear(head_dim, head_dim // reduce_c)
        self.proj_k = nn.Linear(head_dim, head_dim // reduce_c)
        self.down = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, self.reduced_n), std=0.02))
        self.up = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_tokens, self.reduced_n), std=0.02))

    def _check(self, q: Tensor, k: Tensor) -> None:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or tuple(t.shape[1:]) != (self.heads, self.num_tokens, self.head_dim):
                raise ValueError(f"{name} must have shape [B, {self.heads}, {self.num_tokens}, {self.head_dim}] "
                                 f"(the predictor's heads, num_tokens, head_dim), got {list(t.shape)}")
        if q.shape != k.shape:
            raise ValueError(f"q and k must have one shape, got {list(q.shape)} and {list(k.shape)}")

    def coefficients(self, q: Tensor, k: Tensor) -> Tensor:
        """Gamma `[B, H, N-1, n_down]`: softmax over the down-projected keys, cls query dropped."""
        self._check(q, k)
        keys = self.proj_k(k).transpose(-1, -2) @ self.down  # [B, H, c, n_down]
        return torch.softmax((self.proj_q(q[:, :, 1:]) @ keys) * self.scale, -1)

    def approx(self, q: Tensor, k: Tensor, sparse: bool = True) -> Tensor:
        """`A_hat [B, H, N-1, N]`; `sparse=False` (reconstruction phase) skips both sparsifications."""
        coef = self.coefficients(q, k)
        if not bool_arg("sparse", sparse):
            return coef @ self.up.t()
        top = coef.topk(self.coef_topk, -1)
        coef = torch.zeros_like(coef).scatter_(-1, top.indices, top.values)
        basis = self.up.t().abs()
        return coef @ torch.where(basis > self.basis_threshold, basis, torch.zeros_like(basis))

    @torch.no_grad()
    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        scores = self.approx(q, k, sparse=True)
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=q.device)
        keep.scatter_(-1, scores.topk(self.budget, -1).indices, True)
        dense_cls = torch.ones_like(keep[:, :, :1])
        return torch.cat([dense_cls, keep], 2)


class SparsifinerAttention(nn.Module):
    """ViT multi-head self-attention `[B, N, C] -> [B, N, C]` whose softmax runs through the engine over
    its predictor's mask (`mode="sparse"`) or over every key (`mode="dense"`: the teacher, and the
    student while its predictor learns). `last` holds the q, k of the latest call for the training
    losses and the recall metrics."""

    def __init__(self, dim: int, heads: int, num_tokens: int, *, keep_rate: float = 0.25, qkv_bias: bool = True,
                 block_size: int = 16, backend: str = "auto", **predictor):
        super().__init__()
        self.dim, self.heads = int_arg("dim", dim), int_arg("heads", heads)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.block_size, self.backend = int_arg("block_size", block_size), backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bool_arg("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.predictor = SparsifinerPredictor(dim // heads, num_tokens, heads, keep_rate=keep_rate, **predictor)
        self.mode = "sparse"
        self.last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != self.dim:
            raise ValueError(f"x must have shape [B, N, {self.dim}], got {list(x.shape)}")
        choice_arg("mode", self.mode, ("sparse", "dense"))
        batch, n, _ = x.shape
        q, k, v = self.qkv(x).view(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        self.last = (q, k)
        if self.mode == "dense":
            layout = full(n, block_q=self.block_size, block_k=self.block_size).to(x.device)
        else:
            layout = mask_layout(self.predictor(q, k), self.block_size).to(x.device)
        out = blockattn.attention(q, k, v, layout, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(batch, n, self.dim))

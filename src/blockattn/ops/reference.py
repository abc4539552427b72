"""Dense masked attention in float64: the oracle every backend is tested against."""
from __future__ import annotations

import torch
from torch import Tensor

from blockattn.layout import BlockLayout


def reference_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, *, scale: float | None = None,
                        return_lse: bool = False):
    """Materialises the `[Lq, Lk]` token mask and scores in float64 (small sizes only).

    Output in q's dtype (float64 inputs give float64 output); rows with no key give zeros and
    `lse = -inf`. Differentiable through autograd.
    """
    batch, heads_q, _, dim = q.shape
    group = heads_q // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    k64 = k64.repeat_interleave(group, dim=1)
    v64 = v64.repeat_interleave(group, dim=1)
    mask = layout.to_token_mask().to(q.device)
    scores = (q64 @ k64.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_key = mask.any(-1).expand_as(lse)
    probs = torch.exp(scores - torch.where(has_key, lse, 0.0).unsqueeze(-1))
    out = (probs @ v64).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def available(device=None) -> str:
    return "available"


def can_run(q, k, v, layout) -> str:
    return "available"  # float64 on any device, any layout: slow and O(L^2) memory, never chosen by `auto`


def run(q, k, v, layout, *, scale):
    return reference_attention(q, k, v, layout, scale=scale, return_lse=True)

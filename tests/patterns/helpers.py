"""Float64 dense attention under an explicit token mask: the oracle for pattern and module tests."""
import torch


def masked_attention(q, k, v, mask, scale=None):
    """q [B, H, Lq, D], k/v [B, H, Lk, D], mask bool broadcastable to [B, H, Lq, Lk]; float64 math."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.double()).to(q.dtype)

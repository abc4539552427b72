"""Sentence-conditioned channel attention for answer grounding: EAB (exact) and SAB (reconstructed).

Khoshsirat & Kambhamettu, "Sentence Attention Blocks for Answer Grounding" (ICCV 2023, arXiv
2309.11593) and the follow-up "Embedding Attention Blocks for Answer Grounding" (CVPR 2024),
official code khoshsirat/embedding-attention-blocks (`model.py`). Image features `[B, C, H, W]`,
sentence embedding `[B, E]` (all-MiniLM-L6-v2 in the papers, E = 384).

- `EmbeddingAttention` (EAB, as in the official code): `a = softmax_C(W2 ReLU(LN(W1 t)))` with
  W1: E -> 4E and W2: 4E -> C, then `F * a` broadcast over H x W. The gate is a softmax over the
  channels and does not look at the image. 1,578,112 parameters for E = 384, C = 640.
- `SentenceAttentionBlock` (SAB): the ICCV block is described as SE with the sentence embedding
  joined in; no code was published, so this is a reconstruction whose choices are ours: the
  squeezed image descriptor GAP(F) and the sentence embedding are concatenated, then
  `s = sigmoid(W2 ReLU(W1 [GAP(F); t]))` (reduction 16, SE's default) and `F * s`.
Both gates are element-wise scalings, so there is no attention for the engine to run.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from blockattn.modules._block_checks import check_image, check_positive_int, check_same_device_dtype, check_tensor

__all__ = ["EmbeddingAttention", "SentenceAttentionBlock"]


def _check_pair(module, features: Tensor, sentence: Tensor) -> None:
    check_image("features", features, module.channels)
    check_tensor("sentence", sentence, 2, f"[B={features.shape[0]}, E={module.embed_dim}]", d0=features.shape[0],
                 d1=module.embed_dim)
    check_same_device_dtype(module, "features", features)
    check_same_device_dtype(module, "sentence", sentence)


class EmbeddingAttention(nn.Module):
    """EAB: `features * softmax_C(MLP(sentence))`."""

    def __init__(self, embed_dim: int = 384, channels: int = 640):
        super().__init__()
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        self.channels = check_positive_int("channels", channels)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.LayerNorm(4 * embed_dim), nn.ReLU(),
                                 nn.Linear(4 * embed_dim, channels))

    def gate(self, sentence: Tensor) -> Tensor:
        return self.mlp(sentence).softmax(-1)[:, :, None, None]

    def forward(self, features: Tensor, sentence: Tensor) -> Tensor:
        _check_pair(self, features, sentence)
        return features * self.gate(sentence)


class SentenceAttentionBlock(nn.Module):
    """SAB (reconstruction): `features * sigmoid(W2 ReLU(W1 [GAP(features); sentence]))`."""

    def __init__(self, channels: int, embed_dim: int = 384, *, reduction: int = 16):
        super().__init__()
        self.channels = check_positive_int("channels", channels)
        self.embed_dim = check_positive_int("embed_dim", embed_dim)
        check_positive_int("reduction", reduction)
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels + embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def gate(self, features: Tensor, sentence: Tensor) -> Tensor:
        joint = torch.cat([features.mean((2, 3)), sentence], dim=1)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(joint))))[:, :, None, None]

    def forward(self, features: Tensor, sentence: Tensor) -> Tensor:
        _check_pair(self, features, sentence)
        return features * self.gate(features, sentence)

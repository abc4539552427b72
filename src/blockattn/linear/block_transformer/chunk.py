"""Block Transformer's global-to-local token mixing, both levels through the engine.

Paper: Ho et al., "Block Transformer: Global-to-Local Language Modeling for Fast Inference"
(NeurIPS 2024). Rule: tokens are grouped into blocks of `block_size` (the paper uses 4); an
embedder pools each block into one embedding, a block decoder runs causal attention over the
block sequence, and its output at block j is the context with which the token decoder
decodes block j+1 using attention *only inside that block*. So token t sees the past through
one context vector per block and its own block's earlier tokens directly; no token-level KV
cache spans blocks. This op is a one-layer analogue, not the paper's model: the embedder is a
mean over the block, which is permutation-invariant inside a block (the paper's embedder
concatenates the block's token embeddings), and the context is added to the output of the local
attention (the paper's "summation" strategy adds an expanded, per-position context to the token
decoder's input; its main configs use the context as a prefix). `BlockTransformerMixer` in
`blockattn.bench.mqar` is the concatenating, input-summation layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

import blockattn
from blockattn.layout import BlockLayout
from blockattn.linear._checks import check_causal, check_positive_int, check_qkv


def block_transformer(q: Tensor, k: Tensor, v: Tensor, *, block_size: int = 4, scale: float | None = None,
                      causal: bool = True) -> Tensor:
    """Causal global-to-local attention.

    Args:
        q, k, v: `[B, H, L, D]`; L must be a multiple of `block_size`.
        block_size: tokens per block (paper: 4).

    Returns:
        `[B, H, L, D]`: local causal attention within each block plus, for every token of
        block j > 0, the block decoder's output at block j−1 (causal attention over the
        mean-pooled q, k, v of blocks 0..j−1).
    """
    check_qkv(q, k, v, same_value_dim=True)
    check_causal(causal)
    check_positive_int("block_size", block_size)
    batch, heads, length, dim = q.shape
    if length % block_size:
        raise ValueError(f"sequence length ({length}) must be a multiple of block_size ({block_size})")
    n = length // block_size
    pooled = [t.reshape(batch, heads, n, block_size, dim).mean(dim=3) for t in (q, k, v)]
    context = blockattn.attention(*pooled, blockattn.patterns.causal(n), scale=scale)
    # Block j decodes from the context of block j−1: the first block has none.
    context = torch.cat([torch.zeros_like(context[:, :, :1]), context[:, :, :-1]], dim=2)
    inside = BlockLayout.from_dense(torch.eye(n, dtype=torch.bool, device=q.device), q_len=length, k_len=length,
                                    block_q=block_size, block_k=block_size, causal=True)
    local = blockattn.attention(q, k, v, inside, scale=scale)
    return local + context.repeat_interleave(block_size, dim=2)

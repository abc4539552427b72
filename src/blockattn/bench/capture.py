"""Capture the post-RoPE queries, keys and values each attention layer of a Hugging Face model sees.

A temporary attention function is registered with transformers' `AttentionInterface`; it records
`q [B, Hq, L, D]`, `k, v [B, Hkv, L, D]` and then runs SDPA, so the model's outputs are unchanged.
"""
from __future__ import annotations

import torch


def capture_qkv(model, input_ids: torch.Tensor, *, layers: list[int] | None = None) -> dict[int, tuple]:
    """Run one prefill of `input_ids [1, L]` and return {layer index: (q, k, v)} for the chosen layers
    (all by default). The model's attention implementation is restored afterwards."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    captured: dict[int, tuple] = {}
    wanted = None if layers is None else set(layers)

    def record(module, query, key, value, attention_mask, **kwargs):
        index = getattr(module, "layer_idx", len(captured))
        if wanted is None or index in wanted:
            captured[index] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("blockattn_capture", record)
    AttentionMaskInterface.register("blockattn_capture", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("blockattn_capture")
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return captured

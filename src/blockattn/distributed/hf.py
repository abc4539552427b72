"""A Hugging Face model's prefill with the sequence sharded across ranks (`blockattn.distributed.attention`).

Every rank runs the whole model on its shard of the tokens (`shard(input_ids, layout, dim=1)`) with the
matching position ids (`shard(arange(L), layout, dim=1)`, so RoPE sees global positions); only attention
talks to the other ranks, through the layout's plan. Registered the same way as `blockattn.hf`
(https://huggingface.co/docs/transformers/attention_interface): an attention function plus a mask function
that returns None (the token rule comes from the layout), as `AttentionInterface` /
`AttentionMaskInterface` entries named `"blockattn_cp"`. Prefill only: no KV cache, no padding.

    layout = blockattn.patterns.causal(L)
    ids, pos = (shard(t, layout, dim=1) for t in (input_ids, torch.arange(L)[None]))
    with blockattn.distributed.hf.sharded(model, layout):
        logits = unshard(model(ids, position_ids=pos, use_cache=False).logits, layout, dim=1)
"""
from __future__ import annotations

import contextlib

from torch import Tensor

from blockattn import patterns
from blockattn.distributed.api import attention
from blockattn.layout import BlockLayout

NAME = "blockattn_cp"
_ATTR = "_blockattn_cp"


def _no_mask(*args, **kwargs):
    return None


def register():
    """Register the `"blockattn_cp"` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs):
    """transformers attention function over this rank's shard: returns `(out [B, L_r, Hq, D], None)`."""
    state = getattr(module, _ATTR, None)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs '{NAME}' outside blockattn.distributed.hf.sharded(model, ...)")
    layout, group, bands = state
    if dropout and module.training:
        raise ValueError(f"blockattn has no attention dropout; got dropout={dropout} in training mode")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"sharded attention is for prefill: q has {query.shape[2]} tokens, k {key.shape[2]} "
                         "(call the model with use_cache=False and no past_key_values)")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None:
        # transformers' causal sliding rule keeps q - window < k <= q
        if window not in bands:
            bands[window] = patterns.sliding_window(layout.q_len, window=(int(window) - 1, 0),
                                                    block_q=layout.block_q, block_k=layout.block_k)
        layout = bands[window]
    out = attention(query, key, value, layout, group=group, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def sharded(model, layout: BlockLayout, group=None):
    """Inside the block, `model`'s attention layers attend over `layout` with the sequence sharded on `group`.

    Args:
        model (PreTrainedModel):
            a transformers model whose attention goes through `AttentionInterface`.
        layout (BlockLayout):
            the global layout of the full sequence (e.g. `patterns.causal(L)`); sliding layers get the
            model's band at the same length instead.
        group (ProcessGroup, Optional):
            the context-parallel group. Default: the default group.
    """
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    register()
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention modules with a layer_idx")
    previous = model.config._attn_implementation
    bands = {}
    for m in modules:
        setattr(m, _ATTR, (layout, group, bands))
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        for m in modules:
            delattr(m, _ATTR)

"""Hugging Face transformers integration: `attn_implementation="blockattn"` and `patch(model, method, **params)`.

The attention function registered with `AttentionInterface` receives post-RoPE `q [B, Hq, Lq, D]` and
`k, v [B, Hkv, Lk, D]` (the KV cache already updated, GQA heads not repeated). Prefill calls select a
layout with the patched method and run it on the engine; decoding steps (`Lq <= decode_max_q` with a
cache behind them) attend densely over the cache, bottom-right aligned, unless a decode policy is given.
A mask function is registered with `AttentionMaskInterface` too: without it transformers silently
passes `attention_mask=None`. It stays O(L): None, or the 2-D `[B, Lk]` padding mask; the token rule
comes from the layout.

Hybrid models (Gemma 3: `config.layer_types` mixes "sliding_attention" and "full_attention") keep their
structure: a sliding layer runs the engine's sliding-window layout with the module's window (HF's rule
`q - window < k <= q`: the query and the `window - 1` keys before it), so it computes only the tiles
the band touches; the method applies to the full-attention layers unless `layer_types=` says otherwise.
The module's `scaling` (Gemma: `query_pre_attn_scalar ** -0.5`) is passed to the engine; attention-logit
soft-capping (Gemma 2) is refused, the engine has none.

    with blockattn.hf.patch(model, "xattention", threshold=0.9):
        model.generate(input_ids, max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import torch
from torch import Tensor

import blockattn
from blockattn import methods
from blockattn._registry import split_spec
from blockattn.layout import BlockLayout

NAME = "blockattn"
_PLAN_ATTR = "_blockattn_plan"
HOOKS_ATTR = "_blockattn_hooks"


@dataclasses.dataclass
class Stats:
    """What the patched layers did since the last `reset()`: calls, time in selection and attention, density."""
    prefill_calls: int = 0
    decode_calls: int = 0
    select_seconds: float = 0.0
    attend_seconds: float = 0.0
    density_sum: float = 0.0   # sum over prefill calls of computed tiles / causal tiles

    @property
    def density(self) -> float:
        return self.density_sum / self.prefill_calls if self.prefill_calls else float("nan")

    def reset(self):
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)


@dataclasses.dataclass
class Plan:
    """What one attention layer does: its prefill method (None = dense), optional per-head methods,
    the decode policy and the engine backend."""
    method: methods.Method | None
    head_methods: Callable[[int], methods.Method | None] | None = None
    decode: Callable | None = None
    decode_max_q: int = 16
    backend: str = "auto"
    max_len: int | None = None
    stats: Stats = dataclasses.field(default_factory=Stats)
    layer_type: str = "full_attention"


_DEFAULT_PLAN = Plan(method=None)


def _padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    # cache_position may arrive instead of q_length in some versions; only kv_length matters here
    if attention_mask is None or kv_length is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def register():
    """Register the `"blockattn"` attention and mask functions with transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _padding_mask)


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, **kwargs):
    """transformers attention function: returns `(out [B, Lq, Hq, D], None)`."""
    if dropout and module.training:
        raise ValueError(f"blockattn has no attention dropout; got dropout={dropout} in training mode")
    plan = getattr(module, _PLAN_ATTR, _DEFAULT_PLAN)
    q_len, k_len = query.shape[2], key.shape[2]
    if plan.max_len is not None and k_len > plan.max_len:
        raise ValueError(f"sequence of {k_len} tokens exceeds the model's context of {plan.max_len} "
                         f"(max_position_embeddings)")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    if kwargs.get("is_causal") is None:
        causal = bool(getattr(module, "is_causal", True))
    layer = getattr(module, "layer_idx", None)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if kwargs.get("softcap") is not None:
        raise ValueError(f"layer {layer} asks for attention-logit soft-capping (softcap={kwargs['softcap']}); "
                         "the blockattn engine has none, so it cannot run this model exactly")
    if attention_mask is not None and not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2):
        raise ValueError("the blockattn attention function expects the 2-D padding mask of its own mask "
                         "function; load or switch the model with attn_implementation='blockattn'")
    kv = getattr(module, "_blockattn_kv", None)  # a blockattn.kv policy owns the cache (kv/_hf.py)
    if kv is not None and kv.active:
        out = kv.attention(plan, query, key, value, attention_mask, scaling, causal, layer, window)
    elif attention_mask is not None:
        out = _padded(plan, module, query, key, value, attention_mask, scaling, causal, layer, window)
    else:
        out = _attend(plan, query, key, value, scaling, causal, layer, window)
    hooks = module.__dict__.get(HOOKS_ATTR)  # analysis/hooks.py observes or edits heads; a dict lookup: ~free
    if hooks is not None:
        out = hooks(module, query, key, value, out, attention_mask, scaling, causal, layer, window)
    return out.transpose(1, 2).contiguous(), None


def _padded(plan, module, query, key, value, attention_mask, scaling, causal, layer, window):
    """Batch with padding: each row attends over its contiguous run of real keys (left or right padding)."""
    q_len, k_len = query.shape[2], key.shape[2]
    out = torch.zeros_like(query)
    for b in range(query.shape[0]):
        valid = attention_mask[b].nonzero().flatten()
        if valid.numel() == 0:
            continue
        first, last = int(valid[0]), int(valid[-1]) + 1
        if last - first != valid.numel():
            raise ValueError(f"attention_mask row {b} is not one contiguous run of real tokens "
                             "(only left or right padding is supported)")
        if q_len == k_len:
            rows = slice(first, last)       # prefill: queries are the same tokens as the keys
        else:
            # queries are the last q_len positions; those past the real keys (right padding) are dropped
            rows = slice(max(0, q_len - (k_len - first)), q_len - (k_len - last))
        if rows.stop <= rows.start:
            continue
        out[b:b + 1, :, rows] = _attend(plan, query[b:b + 1, :, rows], key[b:b + 1, :, first:last],
                                        value[b:b + 1, :, first:last], scaling, causal, layer, window)
    return out


def _attend(plan: Plan, query, key, value, scaling, causal, layer, window):
    q_len, k_len = query.shape[2], key.shape[2]
    stats = plan.stats
    start = time.perf_counter()
    decoding = q_len < k_len and q_len <= plan.decode_max_q
    structure_only = plan.method is None and plan.head_methods is None
    if decoding:
        stats.decode_calls += 1
        if plan.decode is None:
            layout = _dense(q_len, k_len, causal) if window is None else _band(q_len, k_len, int(window), causal)
        else:
            layout = _windowed(plan.decode(query, key, layer=layer), window, causal)
    else:
        stats.prefill_calls += 1
        if structure_only and window is not None:
            layout = _band(q_len, k_len, int(window), causal)  # a sliding layer: only the band's tiles
        else:
            layout = _windowed(_select(plan, query, key, causal, layer), window, causal)
        stats.density_sum += layout.density("causal" if causal else "full")
    selected = time.perf_counter()
    out = blockattn.attention(query, key, value, layout, scale=scaling, backend=plan.backend)
    stats.select_seconds += selected - start
    stats.attend_seconds += time.perf_counter() - selected
    return out


@functools.lru_cache(maxsize=64)
def _dense(q_len, k_len, causal):
    # decoding asks for the same (1, k_len) layout in every layer of a step: build it once
    return (blockattn.patterns.causal if causal else blockattn.patterns.full)(q_len, k_len)


def _band_rule(window: int, causal: bool) -> tuple[int, int]:
    # transformers: causal sliding keeps q - window < k <= q (sliding_window_overlay), the bidirectional
    # one |q - k| < window: `window - 1` keys on each allowed side, not `window`
    return (window - 1, 0) if causal else (window - 1, window - 1)


@functools.lru_cache(maxsize=64)
def _band(q_len, k_len, window, causal, block_q=64, block_k=64):
    """A sliding layer's own layout: the band of `_band_rule`, only the tiles it touches."""
    return blockattn.patterns.sliding_window(q_len, k_len, window=_band_rule(window, causal), causal=causal,
                                             block_q=block_q, block_k=block_k)


def _windowed(layout: BlockLayout, window, causal) -> BlockLayout:
    """A method's layout on a sliding layer (chosen with `layer_types=`/`layers=`): cut to the band."""
    if window is None:
        return layout
    return layout & _band(layout.q_len, layout.k_len, int(window), causal, layout.block_q, layout.block_k)


def _select(plan: Plan, query, key, causal, layer) -> BlockLayout:
    if plan.head_methods is None:
        if plan.method is None:
            return _dense(query.shape[2], key.shape[2], causal)
        return _checked(plan.method, plan.method.select(query, key, causal=causal, layer=layer), causal, query, key)
    heads, group = query.shape[1], query.shape[1] // key.shape[1]
    per_head = []
    for h in range(heads):
        method = plan.head_methods(h)
        q, k = query[:, h:h + 1], key[:, h // group:h // group + 1]
        layout = _dense(q.shape[2], k.shape[2], causal) if method is None else \
            _checked(method, method.select(q, k, causal=causal, layer=layer), causal, q, k)
        per_head.append(layout.expand(query.shape[0], 1) if layout.batch != query.shape[0] else layout)
    return _stack_heads(per_head)


def _checked(method, layout, causal, query, key) -> BlockLayout:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"method {method.name!r} returned {type(layout).__name__}, expected a BlockLayout")
    if (layout.q_len, layout.k_len) != (query.shape[2], key.shape[2]):
        raise ValueError(f"method {method.name!r} returned a layout for ({layout.q_len}, {layout.k_len}) tokens, "
                         f"expected ({query.shape[2]}, {key.shape[2]})")
    if not causal and layout.causal:
        raise ValueError(f"method {method.name!r} builds causal layouts; it cannot serve a bidirectional model")
    if causal and not layout.is_causal():
        raise ValueError(f"method {method.name!r} returned a layout in which a query sees a later key; a causal "
                         "model must never see the future (select it with causal=True)")
    return layout


def _check_serves(method, causal: bool, where: str) -> None:
    """Refuse, before any forward, a method that cannot serve this model: one that needs a token grid
    (a language model has none) or whose rule has no mode for the model's causality."""
    if method is None:
        return
    if method.needs_grid:
        raise ValueError(f"{where}: method {method.name!r} needs a token grid (an image or video); a language "
                         "model's tokens form a plain sequence, so it cannot serve this model")
    method.check_causal(causal)


def _stack_heads(layouts: list[BlockLayout]) -> BlockLayout:
    blocks = {(l.block_q, l.block_k) for l in layouts}
    if len(blocks) > 1:
        raise ValueError(f"per-head methods must share one tile size to be stacked into a layer's layout, "
                         f"got {sorted(blocks)}")
    return BlockLayout.cat(layouts, dim=1)


# ---------------------------------------------------------------------------------------------- patching
def _resolve(spec, name_hint: str):
    """A method from a name, a Method object, a `(name, params)` pair, a params dict (for the default
    method), or None (dense)."""
    if spec is None or isinstance(spec, methods.Method):
        return spec
    if isinstance(spec, str):
        name, params = split_spec(spec, name_hint)
        return methods.get(name, **params)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return methods.get(spec[0], **spec[1])
    raise TypeError(f"{name_hint} must be a method name, a Method, a (name, params) pair, a params dict or None; "
                    f"got {type(spec).__name__}")


def _per_key(spec, key, default_name: str | None, default_params: dict, what: str):
    """Look up `spec[key]` (dict) or `spec(key)` (callable); a dict value is the default method's params."""
    value = spec(key) if callable(spec) else spec.get(key, ...)
    if value is ...:
        return ...
    if isinstance(value, dict):
        if default_name is None:
            raise ValueError(f"{what} params {value} given but patch() has no method name to apply them to")
        return methods.get(default_name, **{**default_params, **value})
    return _resolve(value, what)


def attention_modules(model) -> list:
    """The attention modules transformers dispatches through `AttentionInterface` (they carry `layer_idx`)."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")
             and any(n in type(m).__name__ for n in ("Attention", "SelfAttention"))]
    return found


class Patch:
    """Handle returned by `patch`: `unpatch()` or use it as a context manager; `.stats` sums every layer."""

    def __init__(self, model, previous, plans):
        self.model, self.previous, self.plans = model, previous, plans

    @property
    def stats(self) -> Stats:
        return self.stats_of()

    def stats_of(self, layer_type: str | None = None) -> Stats:
        """Stats summed over the layers of one type ("full_attention", "sliding_attention"), or all (None)."""
        total = Stats()
        for plan in {id(p): p for p in self.plans}.values():
            if layer_type is not None and plan.layer_type != layer_type:
                continue
            for f in dataclasses.fields(Stats):
                setattr(total, f.name, getattr(total, f.name) + getattr(plan.stats, f.name))
        return total

    def reset_stats(self):
        for plan in {id(p): p for p in self.plans}.values():
            plan.stats.reset()

    def unpatch(self):
        unpatch(self.model)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False


def layer_type(module) -> str:
    """"sliding_attention" or "full_attention" (or the model's own name) for one attention module."""
    kind = getattr(module, "layer_type", None)
    types = getattr(getattr(module, "config", None), "layer_types", None)
    if kind is None and types is not None and getattr(module, "layer_idx", None) is not None:
        kind = types[module.layer_idx]
    if kind is None:
        kind = "sliding_attention" if getattr(module, "sliding_window", None) else "full_attention"
    return kind


def patch(model, method: str | methods.Method | None = "dense", *, kv=None, layers=None, layer_types=None,
          heads=None, decode=None, decode_max_q: int = 16, backend: str = "auto", **params) -> Patch:
    """Route `model`'s attention through blockattn.

    Args:
        model: a transformers `PreTrainedModel` that supports the attention interface.
        method: registered method name (with `**params` its hyperparameters), a `Method`, or None (dense).
        kv: a KV-cache policy (`blockattn.kv.get(...)`, a name or a spec like "razor:ratio=0.7"): the cache
            of every `use_cache` call keeps, per KV head, only what the policy keeps (`blockattn.kv`). On a
            hybrid model the sliding layers' cache keeps only their window (the last `window - 1` tokens) and
            the policy acts on the full layers; per layer type: `{"full_attention": spec, "sliding_attention":
            None}` (None on full layers keeps everything).
        layers: per-layer override, `{layer_idx: spec}` or `callable(layer_idx) -> spec`, where spec is a
            method name, a Method, `(name, params)`, a params dict for `method`, or None for dense.
        layer_types: per layer-type override, `{"sliding_attention": spec, "full_attention": spec}` (specs as
            for `layers`, which wins over it). On a hybrid model (sliding and full layers) the default is
            `{"sliding_attention": None}`: sliding layers run their own band, `method` runs on the full
            layers; a method given to sliding layers is cut to their band. Elsewhere `method` runs everywhere.
        heads: per-head override within every layer, `{head: spec}` or `callable(layer_idx, head) -> spec`.
        decode: decode policy for steps with `Lq <= decode_max_q` and a cache: a method name/Method (its
            `select(q, k)` over the cache) or `callable(q, k, layer=...) -> BlockLayout`; None = dense.
        backend: engine backend ("auto" picks the compiled kernel on CPU, Triton on CUDA).

    Returns a `Patch` (also a context manager that unpatches on exit).
    """
    try:
        from transformers import PreTrainedModel
    except ImportError as error:  # pragma: no cover - transformers is an optional extra
        raise ImportError("blockattn.hf needs transformers: pip install 'blockattn[hf]'") from error
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(f"{type(model).__name__} does not route attention through transformers' AttentionInterface "
                        "(_supports_attention_backend is False), so blockattn cannot patch it")
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f"found no attention modules with a layer_idx in {type(model).__name__}; cannot patch it")
    if backend != "auto" and backend not in blockattn.backends():
        raise ValueError(f"backend must be 'auto' or one of {list(blockattn.backends())}, got {backend!r}")
    if isinstance(decode_max_q, bool) or not isinstance(decode_max_q, int) or decode_max_q < 1:
        raise ValueError(f"decode_max_q must be a positive int, got {decode_max_q!r}")
    for name, spec in (("layers", layers), ("layer_types", layer_types), ("heads", heads)):
        if spec is not None and not (isinstance(spec, dict) or callable(spec)):
            raise TypeError(f"{name} must be a dict or a callable, got {type(spec).__name__}")
    kinds = {module.layer_idx: layer_type(module) for module in modules}
    if isinstance(layer_types, dict) and set(layer_types) - set(kinds.values()):
        raise ValueError(f"layer_types keys {sorted(set(layer_types) - set(kinds.values()))} are not layer types "
                         f"of {type(model).__name__}; it has {sorted(set(kinds.values()))}")
    text_config = getattr(model.config, "get_text_config", lambda: model.config)()
    softcap = getattr(text_config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise ValueError(f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping={softcap}); "
                         "the blockattn engine has no soft-capping, so patching would change the model")
    if isinstance(method, str):  # a spec "name:key=value,..."; keyword hyperparameters win
        method, spec_params = split_spec(method, "method")
        params = {**spec_params, **params}
    method_name = method if isinstance(method, str) else None
    if isinstance(method, str):
        base = methods.get(method, **params)
    elif params:
        raise TypeError(f"hyperparameters {sorted(params)} can only be given with a method name")
    else:
        base = _resolve(method, "method")
    decode_fn = _decode_policy(decode)
    if kv is not None:
        from blockattn.kv import _hf as kv_hf
        kv_policy = kv_hf.resolve(model, kv, modules, decode)
    max_len = getattr(model.config, "max_position_embeddings", None)
    rope = getattr(model.config, "rope_parameters", None) or getattr(model.config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
        max_len = None  # scaled RoPE (yarn, linear, ...) extends the context; trust the user

    register()
    previous = model.config._attn_implementation
    plans, by_layer = [], {}
    for module in modules:
        layer = module.layer_idx
        if layer not in by_layer:
            layer_method = base
            hybrid = {"sliding_attention", "full_attention"} <= set(kinds.values())
            if hybrid and kinds[layer] == "sliding_attention":
                layer_method = None  # the model's structure: its band, through the engine
            if layer_types is not None:
                override = _per_key(layer_types, kinds[layer], method_name, params, f"layer_types[{kinds[layer]!r}]")
                if override is not ...:
                    layer_method = override
            if layers is not None:
                override = _per_key(layers, layer, method_name, params, f"layers[{layer}]")
                if override is not ...:
                    layer_method = override
            _check_serves(layer_method, bool(getattr(module, "is_causal", True)), f"layer {layer}")
            head_fn = None
            if heads is not None:
                def head_fn(h, _layer=layer, _default=layer_method):
                    spec = heads(_layer, h) if callable(heads) else heads.get(h, ...)
                    if spec is ...:
                        return _default
                    if isinstance(spec, dict):
                        if method_name is None:
                            raise ValueError("per-head params need patch() to be given a method name")
                        return methods.get(method_name, **{**params, **spec})
                    return _resolve(spec, f"heads[{h}]")
            by_layer[layer] = Plan(layer_method, head_fn, decode_fn, decode_max_q, backend, max_len,
                                   layer_type=kinds[layer])
        setattr(module, _PLAN_ATTR, by_layer[layer])
        plans.append(by_layer[layer])
    model.set_attn_implementation(NAME)
    model._blockattn_previous = previous
    if kv is not None:
        kv_hf.install(model, kv_policy, modules)
    return Patch(model, previous, plans)


def _decode_policy(decode):
    if decode is None:
        return None
    if isinstance(decode, (str, methods.Method, tuple)):
        policy = _resolve(decode, "decode")
        return lambda q, k, layer=None: policy.select(q, k, layer=layer)
    if callable(decode):
        return decode
    raise TypeError(f"decode must be None, a method name, a Method or a callable, got {type(decode).__name__}")


def unpatch(model):
    """Undo `patch`: restore the previous attention implementation and drop the per-layer plans."""
    previous = getattr(model, "_blockattn_previous", None)
    if previous is None:
        raise ValueError("model is not patched by blockattn.hf.patch")
    for module in model.modules():
        if hasattr(module, _PLAN_ATTR):
            delattr(module, _PLAN_ATTR)
    if hasattr(model, "_blockattn_kv_hook"):
        from blockattn.kv import _hf as kv_hf
        kv_hf.uninstall(model)
    model.set_attn_implementation(previous)
    del model._blockattn_previous

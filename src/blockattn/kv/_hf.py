"""Glue between `blockattn.kv` policies and `blockattn.hf.patch(model, kv=...)`.

A forward pre-hook on the patched model gives every `use_cache` call a `KVCache` (it replaces the empty
cache transformers or `generate` would create, and refuses a filled cache of another kind). The patched
attention function hands each layer's call to `attention` below: a prefill chunk attends over its full
K/V with the patch's method, then the policy keeps per KV head what it keeps; a later call attends over
every head's buffer (one engine call per KV head and its query group, on the ragged per-head lengths:
nothing is padded), then the policy may evict.

Hybrid models (Gemma 3: sliding and full layers): a sliding layer can never attend further back than its
window, so its cache keeps the last `window - 1` tokens (what the next query sees besides itself, HF's
rule `q - window < k <= q`), positions kept; the policy acts on the full-attention layers only.
`kv={"full_attention": spec, "sliding_attention": None}` says it per layer type (None on a full layer:
keep everything; None is the only choice for sliding layers today).
"""
from __future__ import annotations

import torch

from blockattn import kv as registry
from blockattn.kv.base import Policy, Selection

ATTR = "_blockattn_kv"
HOOK_ATTR = "_blockattn_kv_hook"


class Runtime:
    """Per patched model: the policy, the cache of the current forward, and an optional probe observer
    (`observer(layer, query, key, value, scale)` sees every layer's post-RoPE q/k/v, for profiling)."""

    def __init__(self, policy: Policy):
        self.policy = policy      # the full-attention layers' policy; sliding layers keep their window
        self.cache = None
        self.observer = None
        self.policy_layers: list[int] = []  # the layers the policy acts on (set by install: not the sliding ones)

    @property
    def active(self) -> bool:
        return self.cache is not None or self.observer is not None

    def pre_forward(self, module, args, kwargs):
        from transformers.cache_utils import Cache

        from blockattn.kv.cache import KVCache
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        past = kwargs.get("past_key_values")
        if not use_cache or self.observer is not None:
            self.cache = None
            return None
        if isinstance(past, KVCache):
            self.cache = past
            return None
        if past is None or (isinstance(past, Cache) and past.get_seq_length() == 0):
            self.cache = KVCache(self.policy)
            kwargs["past_key_values"] = self.cache
            return args, kwargs
        raise ValueError(f"past_key_values is a {type(past).__name__} holding {past.get_seq_length()} tokens; a model "
                         "patched with kv= needs its own cache: pass none, or the blockattn.kv.KVCache a previous "
                         "call returned")

    def attention(self, plan, query, key, value, attention_mask, scaling, causal, layer, window):
        """One patched layer's attention under the policy: `[B, Hq, Lq, D]`."""
        return _attention(self, plan, query, key, value, attention_mask, scaling, causal, layer, window)


class KeepAll(Policy):
    """Keep every token (a full layer given `None` in a per-layer-type `kv=` dict)."""

    name = "keep_all"
    compresses = False

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        return Selection([torch.arange(n, device=key.device).expand(batch, n)] * heads)


def _per_type(kv, modules) -> Policy:
    """`kv={"full_attention": spec, "sliding_attention": None}` -> the full layers' policy."""
    from blockattn.integrations.hf import layer_type
    kinds = {layer_type(m) for m in modules}
    unknown = set(kv) - kinds
    if unknown:
        raise ValueError(f"kv keys {sorted(unknown)} are not layer types of this model; it has {sorted(kinds)}")
    if kv.get("sliding_attention") is not None:
        raise ValueError("kv['sliding_attention'] must be None: a sliding layer's cache keeps its window (the "
                         "last window - 1 tokens); policies act on the full-attention layers")
    spec = kv.get("full_attention")
    return KeepAll() if spec is None else registry.parse(spec)


def resolve(model, kv, modules, decode) -> Policy:
    """The policy for `patch(kv=...)`, after checking the model has a KV cache to act on."""
    policy = _per_type(kv, modules) if isinstance(kv, dict) else registry.parse(kv)
    if getattr(model.config, "is_encoder_decoder", False) or not all(getattr(m, "is_causal", False) for m in modules):
        raise ValueError(f"kv policies act on a decoder's KV cache; {type(model).__name__} has none (its attention "
                         "is not causal self-attention)")
    if decode is not None:
        raise ValueError("decode= and kv= both decide how decoding attends; give one of them")
    return policy


def install(model, policy: Policy, modules) -> Runtime:
    from blockattn.integrations.hf import layer_type
    runtime = Runtime(policy)
    for module in modules:
        setattr(module, ATTR, runtime)
    runtime.policy_layers = sorted({m.layer_idx for m in modules if layer_type(m) != "sliding_attention"})
    setattr(model, HOOK_ATTR, model.register_forward_pre_hook(runtime.pre_forward, with_kwargs=True))
    try:
        policy.setup(model, runtime)
    except BaseException:
        # hf.patch raises before returning its Patch, so no `with` exit will undo it: undo it here, or the
        # model stays patched (and every later unpatched call meets a KVCache)
        from blockattn.integrations.hf import unpatch
        unpatch(model)
        raise
    return runtime


def uninstall(model) -> None:
    hook = getattr(model, HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, HOOK_ATTR)
    for module in model.modules():
        if hasattr(module, ATTR):
            delattr(module, ATTR)


def _attention(runtime: Runtime, plan, query, key, value, attention_mask, scaling, causal, layer, window):
    from blockattn.integrations.hf import _attend
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if runtime.observer is not None:
        out = _attend(plan, query, key, value, scaling, causal, layer, window)
        runtime.observer(layer, query, key, value, scale)
        return out
    if attention_mask is not None:
        raise ValueError("kv policies take batches without padding (attention_mask all ones); run padded "
                         "prompts one at a time")
    state = runtime.cache.layers[layer]
    state.awaiting_attention = False
    if plan.max_len is not None and state.seen > plan.max_len:
        raise ValueError(f"sequence of {state.seen} tokens exceeds the model's context of {plan.max_len} "
                         "(max_position_embeddings)")
    if window is not None:
        return _sliding(plan, state, query, key, value, scaling, causal, layer, int(window))
    policy = runtime.policy
    if state.pending is not None:
        out = policy.prefill_attend(runtime.cache, layer, query, key, value, scale, plan.backend)
        if out is None:
            out = _attend(plan, query, key, value, scaling, causal, layer, window)
        _store(state, policy.select(layer, query, key, value, scale), key, value)
        return out
    out = policy.attend(runtime.cache, state, layer, query, scale, plan.backend)
    policy.after_attend(runtime.cache, state, layer, query, scale)
    return out


def window_selection(key, window: int) -> Selection:
    """What a sliding layer keeps of a prefill's `key [B, Hkv, n, D]`: its last `window - 1` tokens, every
    head (for code that builds a `KVCache` from captured K/V, as bench/kv_eval.py does)."""
    keep, n = max(window - 1, 0), key.shape[2]
    index = torch.arange(max(0, n - keep), n, device=key.device).expand(key.shape[0], -1)
    return Selection([index] * key.shape[1], capacity=[keep] * key.shape[1])


def _sliding(plan, state, query, key, value, scaling, causal, layer, window):
    """A sliding layer: attend over its window (the engine's band), then keep the last `window - 1` tokens,
    all a later query can see besides itself (HF's DynamicSlidingWindowLayer keeps as many)."""
    from blockattn.integrations.hf import _attend
    keep = max(window - 1, 0)
    if state.pending is not None:
        out = _attend(plan, query, key, value, scaling, causal, layer, window)
        _store(state, window_selection(key, window), key, value)
        return out
    # the buffers hold the last <= window - 1 tokens and the new ones, contiguous in position: the band of
    # `_attend` (bottom-right aligned) is exact over them
    out = _attend(plan, query, torch.stack(state.head_keys, 1), torch.stack(state.head_values, 1), scaling,
                  causal, layer, window)
    for h in range(len(state.head_keys)):
        n = state.head_keys[h].shape[1]
        if n > keep:
            # a copy, not a view: the view would pin the longer buffer (and cache_bytes would undercount it)
            for buffers in (state.head_keys, state.head_values, state.positions):
                buffers[h] = buffers[h][:, n - keep:].clone()
    return out


def _store(state, selection, key, value) -> None:
    heads, n, dim = key.shape[1], key.shape[2], key.shape[3]
    if len(selection.keep) != heads:
        raise ValueError(f"kv policy returned {len(selection.keep)} head selections, expected {heads}")
    compensate = selection.compensate or [False] * heads
    capacity = selection.capacity or [None] * heads
    keys, values, comps = [], [], []
    for h in range(heads):
        index = selection.keep[h]
        gather = index.unsqueeze(-1).expand(-1, -1, dim)
        keys.append(key[:, h].gather(1, gather))
        values.append(value[:, h].gather(1, gather))
        dropped = n - index.shape[1]
        if compensate[h] and dropped > 0:
            # RazorAttention's compensation token: the mean of the dropped (post-RoPE) keys and values
            gone = torch.ones(index.shape[0], n, 1, device=key.device).scatter_(1, index.unsqueeze(-1), 0.0)
            k_sum = (key[:, h].float() * gone).sum(1)
            v_sum = (value[:, h].float() * gone).sum(1)
            count = torch.full((key.shape[0],), float(dropped), device=key.device)
            comps.append(((k_sum / dropped).to(key.dtype), (v_sum / dropped).to(value.dtype), count))
        else:
            comps.append(None)
    state.store(list(selection.keep), keys, values, comps, capacity)

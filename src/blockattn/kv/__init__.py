"""Decode-time KV policies: which cached tokens each KV head keeps, on a cache that really shrinks.

    policy = blockattn.kv.get("razor", ratio=0.7)
    with blockattn.hf.patch(model, kv=policy):          # or kv="razor:ratio=0.7"
        out = model(ids, use_cache=True)                 # out.past_key_values holds only the kept tokens
    blockattn.kv.cache_bytes(out.past_key_values)

A policy is one small dataclass per paper (kvpress's shape, `base.Policy`); `ratio` is the fraction of
the cache removed (kvpress's `compression_ratio`). The cache is `KVCache` (`cache.py`); the glue with
transformers is `_hf.py`.
"""
from __future__ import annotations

from blockattn._registry import Registry, split_spec
from blockattn.kv.base import Policy, ScorerPolicy, Selection

_REGISTRY = Registry("kv policy", "policies", __name__, __path__, internal=("base", "cache", "_hf"))
register = _REGISTRY.register


def names() -> list[str]:
    """Every registered KV policy name."""
    return _REGISTRY.names()


def get(name: str, **params) -> Policy:
    """Construct a registered policy with the given hyperparameters (its paper's defaults otherwise)."""
    return _REGISTRY.get(name, **params)


def parse(spec) -> Policy:
    """A policy from a `Policy`, a name, or a spec string `"razor:ratio=0.7,sink=4"`."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"kv must be a policy name, a spec string like 'razor:ratio=0.7' or a blockattn.kv "
                        f"Policy, got {type(spec).__name__}")
    name, params = split_spec(spec, "kv policy")
    return get(name, **params)


def cache_bytes(cache) -> int:
    """Bytes of tensor data `cache` really holds (a `KVCache` or any transformers `Cache`)."""
    from blockattn.kv.cache import cache_bytes as count
    return count(cache)


def __getattr__(name):
    # transformers is optional and slow to import: the cache class loads on first use
    if name == "KVCache":
        from blockattn.kv.cache import KVCache
        return KVCache
    raise AttributeError(f"module 'blockattn.kv' has no attribute {name!r}")


__all__ = ["KVCache", "Policy", "ScorerPolicy", "Selection", "cache_bytes", "get", "names", "parse", "register"]

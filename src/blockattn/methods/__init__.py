"""Dynamic block-selection methods, one module per paper, registered by name.

    method = blockattn.methods.get("xattention", threshold=0.9)
    layout = method.select(q, k)
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from blockattn.methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: `@register("xattention")` makes the method reachable by name."""
    def wrap(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def _load_all():
    # every module in this package (and the static baselines in patterns.methods) registers itself on import
    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base",):
            importlib.import_module(f"{__name__}.{info.name}")


def names() -> list[str]:
    """Every registered method name."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str, **params) -> Method:
    """Construct a registered method with the given hyperparameters (paper defaults otherwise)."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(f"method {name!r} does not take {unknown}; its parameters are {sorted(fields)}")
    return cls(**params)


__all__ = ["Method", "get", "names", "register"]

"""Dynamic block-selection methods, one module per paper, registered by name.

    method = blockattn.methods.get("xattention", threshold=0.9)
    layout = method.select(q, k)
"""
from __future__ import annotations

from blockattn._registry import Registry
from blockattn.methods.base import Method

# every module in this package registers its method on import
_REGISTRY = Registry("method", "methods", __name__, __path__, internal=("base",))
register = _REGISTRY.register


def names() -> list[str]:
    """Every registered method name."""
    return _REGISTRY.names()


def training_free() -> list[str]:
    """The registered methods that run from their paper's defaults (no trained weights to give): what
    `blockattn eval`, `compare` and the benchmarks sweep by default."""
    return _REGISTRY.without_required()


def get(name: str, **params) -> Method:
    """Construct a registered method with the given hyperparameters (paper defaults otherwise)."""
    return _REGISTRY.get(name, **params)


__all__ = ["Method", "get", "names", "register", "training_free"]

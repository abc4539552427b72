"""blockattn: block-structured attention on one exact engine.

    layout = blockattn.patterns.causal(4096)               # or methods.get("xattention").select(q, k)
    out = blockattn.attention(q, k, v, layout)             # computes only the layout's tiles
"""
from blockattn import methods, patterns
from blockattn.functional import attention, backends, sparse_attention
from blockattn.layout import BlockLayout

__version__ = "0.1.0"


def __getattr__(name):
    # loaded on first use: hf and models import transformers (an optional extra, slow to import), linear
    # and modules are whole families of operators and layers, kv and distributed the decode-time cache
    # policies and context parallelism, analysis the head-level tools: most users of the engine never touch them
    if name in ("hf", "models", "linear", "modules", "kv", "distributed", "analysis"):
        import importlib
        return importlib.import_module(f"blockattn.{name}")
    raise AttributeError(f"module 'blockattn' has no attribute {name!r}")

__all__ = ["BlockLayout", "attention", "backends", "methods", "patterns", "sparse_attention", "__version__"]

"""Static layouts: they need no queries or keys, only lengths and the pattern's parameters."""
from blockattn.patterns.basic import causal, full, per_head, random_blocks, sliding_window

__all__ = ["causal", "full", "per_head", "random_blocks", "sliding_window"]

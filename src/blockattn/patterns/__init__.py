"""Static layouts: they need no queries or keys, only lengths and the pattern's parameters."""
from blockattn.patterns.basic import causal, full, per_head, random_blocks, sliding_window
from blockattn.patterns.halo import halo
from blockattn.patterns.neighborhood import from_tiled, neighborhood, neighborhood_ranges, tiled_permutation, to_tiled
from blockattn.patterns.windows import double_window, window_attention

__all__ = ["causal", "full", "per_head", "random_blocks", "sliding_window",
           "neighborhood", "neighborhood_ranges", "tiled_permutation", "to_tiled", "from_tiled",
           "halo", "window_attention", "double_window"]

"""Static layouts: they need no queries or keys, only lengths and the pattern's parameters."""
from blockattn.patterns.basic import causal, full, per_head, random_blocks, sliding_window
from blockattn.patterns.block_causal import block_causal, dual_rope_position_ids, frame_segment_ids, segment_causal
from blockattn.patterns.groups import dreamvla, group_layout
from blockattn.patterns.halo import halo
from blockattn.patterns.neighborhood import from_tiled, neighborhood, neighborhood_ranges, tiled_permutation, to_tiled
from blockattn.patterns.sinks import a_shape, streaming
from blockattn.patterns.static_sparse import dilated, global_tokens, vertical_slash
from blockattn.patterns.strided import s2_attention
from blockattn.patterns.windows import double_window, window_attention

__all__ = ["causal", "full", "per_head", "random_blocks", "sliding_window",
           "neighborhood", "neighborhood_ranges", "tiled_permutation", "to_tiled", "from_tiled",
           "halo", "window_attention", "double_window",
           "block_causal", "segment_causal", "frame_segment_ids", "dual_rope_position_ids",
           "group_layout", "dreamvla", "s2_attention", "vertical_slash", "dilated", "global_tokens",
           "streaming", "a_shape"]

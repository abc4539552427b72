"""BASED: Taylor-feature linear attention plus a small sliding window of softmax attention."""
from blockattn.linear.based.chunk import based, taylor_feature_map, taylor_linear_attention
from blockattn.linear.based.recurrent import based_linear_step

__all__ = ["based", "based_linear_step", "taylor_feature_map", "taylor_linear_attention"]

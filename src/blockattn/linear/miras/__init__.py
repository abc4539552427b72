"""Miras: associative memories built from four composable choices; Moneta, Yaad, Memora as configurations."""
from blockattn.linear.miras.chunk import memory_chunk
from blockattn.linear.miras.common import MemoryState, MirasParts
from blockattn.linear.miras.naive import memory_naive, memory_step
from blockattn.linear.miras.parts import (GradientDescent, HuberBias, KLRetention, L2Bias, L2Retention, LinearMemory,
                                          LpBias, LqRetention, MLPMemory, MomentumDescent, ResidualMLPMemory)

__all__ = ["GradientDescent", "HuberBias", "KLRetention", "L2Bias", "L2Retention", "LinearMemory", "LpBias",
           "LqRetention", "MLPMemory", "MemoryState", "MirasParts", "MomentumDescent", "ResidualMLPMemory", "memory_chunk",
           "memory_naive", "memory_step"]

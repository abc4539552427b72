"""Titans: a neural long-term memory trained at test time (surprise, momentum, forgetting); MAC / MAG / MAL."""
from blockattn.linear.titans.chunk import titans
from blockattn.linear.titans.layers import NeuralMemory, TitansMAC, TitansMAG, TitansMAL
from blockattn.linear.titans.naive import Titans, titans_naive, titans_step

__all__ = ["NeuralMemory", "Titans", "TitansMAC", "TitansMAG", "TitansMAL", "titans", "titans_naive", "titans_step"]

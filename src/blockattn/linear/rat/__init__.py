"""RAT: linear recurrence inside chunks, softmax attention across chunk summaries."""
from blockattn.linear.rat.chunk import rat
from blockattn.linear.rat.recurrent import RATCache, rat_step

__all__ = ["RATCache", "rat", "rat_step"]

"""Lightning Attention 1/2 (TransNormerLLM): causal linear attention with per-head decay."""
from blockattn.linear.lightning.chunk import lightning_attention
from blockattn.linear.lightning.recurrent import lightning_attention_step

__all__ = ["lightning_attention", "lightning_attention_step"]

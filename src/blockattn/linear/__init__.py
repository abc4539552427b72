"""Linear, recurrent and hybrid attention: `blockattn.linear.<method>(q, k, v, **params)`.

Every op is causal and maps `[B, H, L, D]` to `[B, H, L, D]` like `blockattn.attention`.
Each method lives in its own folder (fla style): `naive.py` is the obviously-correct
recurrent definition, the fast forms (`chunk.py`, `recurrent.py`, `triton.py`) sit beside it.
"""
from blockattn.linear.block_transformer import block_transformer
from blockattn.linear.based import based, based_linear_step, taylor_linear_attention
from blockattn.linear.lightning import lightning_attention, lightning_attention_step
from blockattn.linear.rat import rat, rat_step

__all__ = [
    "based",
    "block_transformer",
    "based_linear_step",
    "taylor_linear_attention",
    "lightning_attention",
    "lightning_attention_step",
    "rat",
    "rat_step",
]

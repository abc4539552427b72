"""Linear, recurrent and hybrid attention: `blockattn.linear.<method>(q, k, v, **params)`.

Every op is causal and maps `[B, H, L, D]` to `[B, H, L, D]` like `blockattn.attention`.
Each method lives in its own folder (fla style): `naive.py` is the obviously-correct
recurrent definition, the fast forms (`chunk.py`, `recurrent.py`, `triton.py`) sit beside it.
"""
from blockattn.linear.block_transformer import block_transformer
from blockattn.linear.based import based, based_linear_step, taylor_linear_attention
from blockattn.linear.lightning import lightning_attention, lightning_attention_step
from blockattn.linear.rat import rat, rat_step
from blockattn.linear.kronecker import tensor_attention, tensor_attention_approx
from blockattn.linear.miras.memora import memora
from blockattn.linear.miras.moneta import moneta
from blockattn.linear.miras.yaad import yaad
from blockattn.linear.titans import titans_step
from blockattn.linear.titans import titans  # after titans_step: the function replaces the subpackage attribute

__all__ = [
    "based",
    "block_transformer",
    "based_linear_step",
    "taylor_linear_attention",
    "lightning_attention",
    "lightning_attention_step",
    "rat",
    "rat_step",
    "memora",
    "moneta",
    "tensor_attention",
    "tensor_attention_approx",
    "titans",
    "titans_step",
    "yaad",
]

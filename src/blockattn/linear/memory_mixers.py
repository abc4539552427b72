"""Factories for the test-time-memory mixers (Titans MAC/MAG/MAL, Moneta, Yaad, Memora) used by MQAR."""
from __future__ import annotations

from torch import nn

from blockattn.linear.miras.layer import MemoryMixer
from blockattn.linear.miras.memora import Memora
from blockattn.linear.miras.moneta import Moneta
from blockattn.linear.miras.yaad import Yaad
from blockattn.linear.titans.layers import TitansMAC, TitansMAG, TitansMAL

NAMES = ("titans_mac", "titans_mag", "titans_mal", "moneta", "yaad", "memora")


def memory_mixer(name: str, d_model: int, *, window: int = 64, chunk_size: int = 16) -> nn.Module:
    """A causal `[B, L, d_model] -> [B, L, d_model]` module; `window` is the sliding window of MAG / MAL."""
    if name == "titans_mac":
        return TitansMAC(d_model, segment=chunk_size)
    if name == "titans_mag":
        return TitansMAG(d_model, window=window, chunk_size=chunk_size)
    if name == "titans_mal":
        return TitansMAL(d_model, window=window, chunk_size=chunk_size)
    configs = {"moneta": Moneta, "yaad": Yaad, "memora": Memora}
    if name not in configs:
        raise ValueError(f"name must be one of {list(NAMES)}, got {name!r}")
    return MemoryMixer(d_model, configs[name]().parts, chunk_size=chunk_size)

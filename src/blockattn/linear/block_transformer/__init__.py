"""Block Transformer: global attention over pooled block embeddings, local attention inside a block."""
from blockattn.linear.block_transformer.chunk import block_transformer

__all__ = ["block_transformer"]

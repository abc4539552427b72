"""Kronecker / tensor attention: exact triple-wise softmax attention and the bounded-entry approximation."""
from blockattn.linear.kronecker.approx import degree_for, entry_bound, error_bound, tensor_attention_approx
from blockattn.linear.kronecker.naive import tensor_attention

__all__ = ["degree_for", "entry_bound", "error_bound", "tensor_attention", "tensor_attention_approx"]

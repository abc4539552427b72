"""Helpers for the linear-attention tests: relative error and gradients of a scalar probe."""
import torch


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grads(fn, inputs, probe):
    """Gradients of sum(fn(*inputs) * probe) with respect to every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    (fn(*leaves) * probe).sum().backward()
    return [t.grad for t in leaves]

"""Exact tensor attention against a plain triple loop over (query, key pair) in float64."""
import itertools
import math

import pytest
import torch

from blockattn.linear.kronecker import tensor_attention


def _loop(q, k1, k2, v1, v2, causal):
    batch, heads, n, d = q.shape
    out = torch.zeros(batch, heads, n, v1.shape[3], dtype=torch.float64)
    for b, h, i in itertools.product(range(batch), range(heads), range(n)):
        pairs = [(j1, j2) for j1 in range(n) for j2 in range(n) if not causal or (j1 <= i and j2 <= i)]
        scores = [math.exp(float((q[b, h, i] * k1[b, h, j1] * k2[b, h, j2]).sum()) / d) for j1, j2 in pairs]
        total = sum(scores)
        for (j1, j2), s in zip(pairs, scores):
            out[b, h, i] += s / total * v1[b, h, j1] * v2[b, h, j2]
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_exact_matches_triple_loop(causal):
    q, k1, k2 = (torch.randn(1, 2, 6, 3, dtype=torch.float64) for _ in range(3))
    v1, v2 = (torch.randn(1, 2, 6, 2, dtype=torch.float64) for _ in range(2))
    out = tensor_attention(q, k1, v1, k2=k2, v2=v2, causal=causal)
    assert torch.allclose(out, _loop(q, k1, k2, v1, v2, causal), rtol=1e-10, atol=1e-12)


def test_single_key_form_uses_k_and_v_twice():
    q, k, v = (torch.randn(1, 1, 5, 3, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(tensor_attention(q, k, v), _loop(q, k, k, v, v, True), rtol=1e-10, atol=1e-12)


def test_bad_inputs():
    q = torch.randn(1, 1, 4, 3)
    with pytest.raises(ValueError, match="feature dims must match"):
        tensor_attention(q, torch.randn(1, 1, 4, 2), q)
    with pytest.raises(ValueError, match="v1 and v2"):
        tensor_attention(q, q, q, v2=torch.randn(1, 1, 4, 2))
    with pytest.raises(ValueError, match="max_len"):
        tensor_attention(q, q, q, max_len=3)
    with pytest.raises(TypeError, match="causal must be a bool"):
        tensor_attention(q, q, q, causal=None)
    with pytest.raises(TypeError, match="k1 must share"):
        tensor_attention(q, q.double(), q)

"""Every causal-only linear op refuses non-causal use, naming the argument."""
import pytest
import torch

from blockattn import linear


@pytest.mark.parametrize("call", [
    lambda q: linear.lightning_attention(q, q, q, torch.ones(1), causal=False),
    lambda q: linear.taylor_linear_attention(q, q, q, causal=False),
    lambda q: linear.based(q, q, q, causal=False),
    lambda q: linear.rat(q, q, q, torch.full_like(q, 0.5), causal=False),
    lambda q: linear.block_transformer(q, q, q, causal=False),
])
def test_non_causal_use_is_refused(call):
    q = torch.randn(1, 1, 16, 4)
    with pytest.raises(ValueError, match="causal-only: causal must be True, got False"):
        call(q)

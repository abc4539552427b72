"""BASED decode steps with a fixed-size state reproduce the parallel form."""
import pytest
import torch

from blockattn.linear import based_linear_step, taylor_linear_attention
from tests.linear._util import rel_err


def test_steps_reproduce_parallel_form():
    q, k, v = torch.randn(2, 2, 30, 4), torch.randn(2, 2, 30, 4), torch.randn(2, 2, 30, 6)
    whole = taylor_linear_attention(q, k, v, block_size=8)
    state = norm = None
    outs = []
    for t in range(30):
        y, state, norm = based_linear_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, norm)
        outs.append(y)
        assert state.shape == (2, 2, 1 + 4 + 16, 6)
    assert rel_err(torch.cat(outs, dim=2), whole) <= 1e-5


def test_step_bad_state():
    q = torch.randn(1, 1, 1, 4)
    with pytest.raises(ValueError, match="state must be"):
        based_linear_step(q, q, q, torch.zeros(1, 1, 5, 4), torch.zeros(1, 1, 5))

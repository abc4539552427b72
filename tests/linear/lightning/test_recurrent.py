"""Decode steps continue a blocked prefill exactly."""
import pytest
import torch

from blockattn.linear import lightning_attention, lightning_attention_step
from tests.linear._util import rel_err


def test_steps_continue_prefill():
    b, h, length, d, prefill = 2, 3, 40, 8, 25
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    decay = torch.rand(h) * 0.2 + 0.8
    whole = lightning_attention(q, k, v, decay, block_size=16)
    out, state = lightning_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], decay,
                                     block_size=16, output_final_state=True)
    steps = [out]
    for t in range(prefill, length):
        o, state = lightning_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], decay, state)
        steps.append(o)
    assert rel_err(torch.cat(steps, dim=2), whole) <= 1e-5


def test_step_bad_input():
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(ValueError, match=r"q must be \[B, H, 1, D\]"):
        lightning_attention_step(torch.randn(1, 2, 3, 8), q, q, torch.ones(2), torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_attention_step(q, q, q, torch.ones(2), torch.zeros(1, 2, 8, 4))

"""The MQAR factories for the test-time-memory mixers: every name builds a causal [B, L, d] -> [B, L, d] module."""
import pytest
import torch

from blockattn.linear.memory_mixers import NAMES, memory_mixer


@pytest.mark.parametrize("name", NAMES)
def test_every_name_builds_a_causal_mixer(name):
    torch.manual_seed(0)
    mixer = memory_mixer(name, 8, window=4, chunk_size=4)
    x = torch.randn(1, 12, 8)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    y, y2 = mixer(x), mixer(x2)
    assert y.shape == x.shape and torch.allclose(y[:, :8], y2[:, :8], atol=1e-6)


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="name must be one of"):
        memory_mixer("mamba", 8)

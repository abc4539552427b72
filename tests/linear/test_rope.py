"""The rotary helper: a rotation (norm kept) whose q·k depends only on the position difference."""
import pytest
import torch

from blockattn.linear._rope import rotary


def test_scores_depend_on_position_differences_only():
    q, k = torch.randn(2, 3, 10, 8, dtype=torch.float64), torch.randn(2, 3, 10, 8, dtype=torch.float64)
    pos = torch.randint(0, 50, (10,))
    a = rotary(q, pos) @ rotary(k, pos).transpose(-1, -2)
    b = rotary(q, pos + 17) @ rotary(k, pos + 17).transpose(-1, -2)
    assert torch.allclose(a, b) and not torch.allclose(a, q @ k.transpose(-1, -2))
    assert torch.allclose(rotary(q, pos).norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(rotary(q, torch.zeros(10, dtype=torch.long)), q)


def test_errors():
    with pytest.raises(ValueError, match="even"):
        rotary(torch.randn(1, 4, 3), torch.arange(4))
    with pytest.raises(TypeError):
        rotary([1.0], torch.arange(1))

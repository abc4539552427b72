"""Neighborhood attention modules equal dense attention under the per-position NA mask."""
import math

import pytest
import torch

from blockattn.modules import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from tests.modules.oracle import dense_module_output
from tests.patterns.test_neighborhood import _naive_mask, _tup


@pytest.mark.parametrize("cls,grid,kwargs", [
    (NeighborhoodAttention1d, (23,), dict(window=5, dilation=2)),
    (NeighborhoodAttention2d, (9, 11), dict(window=(3, 5), stride=(1, 2), causal=(True, False))),
    (NeighborhoodAttention2d, (8, 8), dict(window=5, tile_shape=(4, 4))),
    (NeighborhoodAttention2d, (10, 9), dict(window=3, dilation=(2, 3), tile_shape=(4, 2))),  # groups + padding
    (NeighborhoodAttention3d, (4, 6, 6), dict(window=3, dilation=(1, 2, 1))),
])
def test_module_matches_dense(cls, grid, kwargs):
    torch.manual_seed(0)
    module = cls(16, 4, backend="torch", block=16, **kwargs).double()
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    nd = len(grid)
    mask = _naive_mask(grid, _tup(kwargs["window"], nd), _tup(kwargs.get("dilation", 1), nd),
                       _tup(kwargs.get("stride", 1), nd), _tup(kwargs.get("causal", False), nd))
    torch.testing.assert_close(module(x), dense_module_output(module, x, mask[None]), rtol=1e-10, atol=1e-10)


def test_module_gradients_flow():
    module = NeighborhoodAttention2d(8, 2, 3, backend="torch", block=16)
    x = torch.randn(1, 6, 6, 8, requires_grad=True)
    module(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and module.qkv.weight.grad.abs().sum() > 0


def test_module_errors():
    with pytest.raises(ValueError, match="heads"):
        NeighborhoodAttention2d(10, 4, 3)
    with pytest.raises(ValueError, match="window"):
        NeighborhoodAttention2d(8, 2, (3, 3, 3))
    module = NeighborhoodAttention2d(8, 2, 3)
    with pytest.raises(ValueError, match="channels last"):
        module(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="window"):
        module(torch.randn(1, 2, 2, 8))
    with pytest.raises(TypeError, match="x must be"):
        module("x")

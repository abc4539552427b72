"""HaloAttention equals dense attention under the halo mask; halo=0 is independent block attention."""
import pytest
import torch

from blockattn.modules import HaloAttention
from tests.modules.oracle import dense_module_output
from tests.patterns.helpers import masked_attention
from tests.patterns.test_halo import _naive


def test_halo_module_matches_dense():
    torch.manual_seed(0)
    module = HaloAttention(16, 4, block_size=4, halo=1, backend="torch").double()
    x = torch.randn(2, 8, 12, 16, dtype=torch.float64)
    mask = _naive((8, 12), (4, 4), (1, 1))
    torch.testing.assert_close(module(x), dense_module_output(module, x, mask[None]), rtol=1e-10, atol=1e-10)


def test_halo_zero_is_independent_blocks():
    torch.manual_seed(1)
    module = HaloAttention(8, 2, block_size=4, halo=0, backend="torch").double()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    out = module(x)
    # each 4x4 block on its own equals the full map's output on that block
    block = x[:, 4:8, 0:4]
    torch.testing.assert_close(module(block), out[:, 4:8, 0:4], rtol=1e-10, atol=1e-10)


def test_halo_module_errors():
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, 2, block_size=0)
    with pytest.raises(ValueError, match="halo"):
        HaloAttention(8, 2, halo=-2)
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, 2, block_size=4)(torch.randn(1, 6, 8, 8))

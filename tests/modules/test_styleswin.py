"""StyleSwin double attention equals a two-branch computation: regular windows on the first half of
the channels, Swin-shifted windows (roll + window partition + region mask) on the second half."""
import pytest
import torch

from blockattn.modules import StyleSwinDoubleAttention
from tests.modules.oracle import dense_module_output
from tests.patterns.test_windows import _swin_mask


def test_double_attention_matches_two_branches():
    torch.manual_seed(0)
    heads, grid, window = 4, (8, 8), 4
    module = StyleSwinDoubleAttention(16, heads, window=window, backend="torch").double()
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    regular, shifted = _swin_mask(grid, (4, 4), (0, 0)), _swin_mask(grid, (4, 4), (2, 2))
    mask = torch.stack([regular] * (heads // 2) + [shifted] * (heads // 2))
    torch.testing.assert_close(module(x), dense_module_output(module, x, mask), rtol=1e-10, atol=1e-10)


def test_small_map_uses_one_window():
    module = StyleSwinDoubleAttention(8, 2, window=8, backend="torch").double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    full = torch.ones(1, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(module(x), dense_module_output(module, x, full), rtol=1e-10, atol=1e-10)


def test_styleswin_errors():
    with pytest.raises(ValueError, match="even"):
        StyleSwinDoubleAttention(6, 3)
    with pytest.raises(ValueError, match="window"):
        StyleSwinDoubleAttention(8, 2, window=0)

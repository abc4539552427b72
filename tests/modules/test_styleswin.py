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
    module = StyleSwinDoubleAttention(16, heads, window=window, rel_pos_bias=False, backend="torch").double()
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    regular, shifted = _swin_mask(grid, (4, 4), (0, 0)), _swin_mask(grid, (4, 4), (2, 2))
    mask = torch.stack([regular] * (heads // 2) + [shifted] * (heads // 2))
    torch.testing.assert_close(module(x), dense_module_output(module, x, mask), rtol=1e-10, atol=1e-10)


def test_small_map_uses_one_window():
    module = StyleSwinDoubleAttention(8, 2, window=8, rel_pos_bias=False, backend="torch").double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    full = torch.ones(1, 16, 16, dtype=torch.bool)
    torch.testing.assert_close(module(x), dense_module_output(module, x, full), rtol=1e-10, atol=1e-10)


def official_double_attention(module, x):
    """The official block's two WindowAttention branches written plainly: per half, Swin's cyclic shift
    (roll by −s), window partition, logits q·k·scale + table[(Δy + w − 1)(2w − 1) + Δx + w − 1] with Δ the
    query-minus-key window offset, the region mask, softmax, reverse roll; halves concatenated, projected."""
    batch, height, width, dim = x.shape
    heads, w = module.heads, module.window
    dh, half = dim // heads, heads // 2
    q, k, v = module.qkv(x).view(batch, height, width, 3, heads, dh).permute(3, 0, 4, 1, 2, 5)
    out = torch.zeros_like(q)
    for branch, shift in ((0, 0), (1, w // 2)):
        sl = slice(branch * half, (branch + 1) * half)
        rolled = [torch.roll(t[:, sl], (-shift, -shift), dims=(2, 3)) for t in (q, k, v)]
        region = torch.zeros(height, width, dtype=torch.long)
        if shift:
            for i, ys in enumerate((slice(0, -w), slice(-w, -shift), slice(-shift, None))):
                for j, xs in enumerate((slice(0, -w), slice(-w, -shift), slice(-shift, None))):
                    region[ys, xs] = 3 * i + j
        res = torch.zeros_like(rolled[0])
        for wy in range(height // w):
            for wx in range(width // w):
                ys, xs = slice(wy * w, (wy + 1) * w), slice(wx * w, (wx + 1) * w)
                qw, kw, vw = (t[:, :, ys, xs].reshape(batch, half, w * w, dh) for t in rolled)
                logits = qw @ kw.transpose(-1, -2) * dh ** -0.5
                cy, cx = torch.arange(w).repeat_interleave(w), torch.arange(w).repeat(w)
                idx = (cy[:, None] - cy[None] + w - 1) * (2 * w - 1) + (cx[:, None] - cx[None] + w - 1)
                logits = logits + module.bias_table[branch][idx].permute(2, 0, 1)
                r = region[ys, xs].flatten()
                logits = logits.masked_fill(r[:, None] != r[None], float("-inf"))
                res[:, :, ys, xs] = (torch.softmax(logits, -1) @ vw).view(batch, half, w, w, dh)
        out[:, sl] = torch.roll(res, (shift, shift), dims=(2, 3))
    return module.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim))


def test_relative_position_bias_matches_the_official_branches():
    torch.manual_seed(0)
    module = StyleSwinDoubleAttention(16, 4, window=4, backend="torch").double()
    with torch.no_grad():
        module.bias_table.normal_()  # large enough to matter
    x = torch.randn(2, 8, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(module(x), official_double_attention(module, x), rtol=1e-10, atol=1e-10)
    no_bias = StyleSwinDoubleAttention(16, 4, window=4, rel_pos_bias=False, backend="torch").double()
    no_bias.load_state_dict(module.state_dict(), strict=False)
    assert not torch.allclose(no_bias(x), module(x))


def test_styleswin_errors():
    with pytest.raises(ValueError, match="even"):
        StyleSwinDoubleAttention(6, 3)
    with pytest.raises(ValueError, match="window"):
        StyleSwinDoubleAttention(8, 2, window=0)

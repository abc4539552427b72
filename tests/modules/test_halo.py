"""HaloAttention equals dense attention under the halo mask; halo=0 is independent block attention."""
import pytest
import torch

from blockattn.modules import HaloAttention
from tests.modules.oracle import dense_module_output
from tests.patterns.helpers import masked_attention
from tests.patterns.test_halo import _naive


def test_halo_module_matches_dense():
    torch.manual_seed(0)
    module = HaloAttention(16, 4, block_size=4, halo=1, border="mask", backend="torch").double()
    x = torch.randn(2, 8, 12, 16, dtype=torch.float64)
    mask = _naive((8, 12), (4, 4), (1, 1))
    torch.testing.assert_close(module(x), dense_module_output(module, x, mask[None]), rtol=1e-10, atol=1e-10)


def test_halo_zero_is_independent_blocks():
    torch.manual_seed(1)
    module = HaloAttention(8, 2, block_size=4, halo=0, border="mask", backend="torch").double()
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    out = module(x)
    # each 4x4 block on its own equals the full map's output on that block
    block = x[:, 4:8, 0:4]
    torch.testing.assert_close(module(block), out[:, 4:8, 0:4], rtol=1e-10, atol=1e-10)


def zero_padded_halo(module, x):
    """timm's HaloAttn rule written plainly: zero-pad k and v by the halo, take each block's (b+2h)^2 window,
    logits q·k·scale (+ the factorised relative logits), softmax over every window slot."""
    batch, height, width, dim = x.shape
    heads, b, h = module.heads, module.block_size, module.halo
    win, dh = b + 2 * h, dim // heads
    q, k, v = module.qkv(x).view(batch, height, width, 3, heads, dh).permute(3, 0, 4, 1, 2, 5)  # [B, H, y, x, d]
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, h, h, h, h))  # noqa: E731
    k, v = pad(k), pad(v)
    out = torch.zeros_like(q)
    for by in range(height // b):
        for bx in range(width // b):
            qb = q[:, :, by * b:(by + 1) * b, bx * b:(bx + 1) * b].reshape(batch, heads, b * b, dh)
            kw = k[:, :, by * b:by * b + win, bx * b:bx * b + win].reshape(batch, heads, win * win, dh)
            vw = v[:, :, by * b:by * b + win, bx * b:bx * b + win].reshape(batch, heads, win * win, dh)
            logits = qb @ kw.transpose(-1, -2) * dh ** -0.5
            if module.height_rel is not None:
                for i in range(b * b):
                    iy, ix = divmod(i, b)
                    for j in range(win * win):
                        jy, jx = divmod(j, win)
                        logits[:, :, i, j] += qb[:, :, i] @ (module.height_rel[jy - iy + win - 1]
                                                             + module.width_rel[jx - ix + win - 1])
            y = torch.softmax(logits, -1) @ vw
            out[:, :, by * b:(by + 1) * b, bx * b:(bx + 1) * b] = y.view(batch, heads, b, b, dh)
    return module.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, dim))


@pytest.mark.parametrize("grid,block,halo,rel_pos", [((12, 12), 4, 1, False), ((8, 8), 4, 2, True),
                                                     ((6, 9), 3, 1, True)])
def test_zero_pad_border_matches_timm_rule(grid, block, halo, rel_pos):
    torch.manual_seed(0)
    module = HaloAttention(16, 4, block_size=block, halo=halo, rel_pos=rel_pos, backend="torch").double()
    assert module.border == "zero_pad"
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    expected = zero_padded_halo(module, x)
    # the padded slots' mass is added through the engine's log-sum-exp, which is float32 by contract
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    # the masked border differs exactly at border blocks, and agrees in the interior
    if not rel_pos:
        masked = HaloAttention(16, 4, block_size=block, halo=halo, border="mask", backend="torch").double()
        masked.load_state_dict(module.state_dict())
        diff = (masked(x) - expected).abs().amax(-1)
        assert diff[:, block:2 * block, block:2 * block].max() < 1e-10 and diff[:, :block].min() > 1e-6


def test_rel_pos_gradients_are_finite():
    module = HaloAttention(8, 2, block_size=4, halo=1, rel_pos=True, backend="torch")
    module(torch.randn(1, 8, 8, 8)).square().sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in module.parameters())


def test_halo_module_errors():
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, 2, block_size=0)
    with pytest.raises(ValueError, match="halo"):
        HaloAttention(8, 2, halo=-2)
    with pytest.raises(ValueError, match="border"):
        HaloAttention(8, 2, border="reflect")
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(8, 2, block_size=4)(torch.randn(1, 6, 8, 8))

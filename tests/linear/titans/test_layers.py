"""Titans MAC / MAG / MAL modules: causal, trainable, and MAC's segment mask as the paper defines it."""
import pytest
import torch

from blockattn.linear.titans import TitansMAC, TitansMAG, TitansMAL


@pytest.mark.parametrize("make", [lambda: TitansMAC(8, heads=2, segment=4, persistent=2),
                                  lambda: TitansMAG(8, heads=2, window=4, chunk_size=4),
                                  lambda: TitansMAL(8, heads=2, window=4, chunk_size=4),
                                  lambda: TitansMAG(8, heads=2, window=4, chunk_size=4, persistent=0, residual_norm=True),
                                  lambda: TitansMAL(8, heads=2, window=4, chunk_size=4, residual_norm=True),
                                  lambda: TitansMAC(8, heads=2, segment=4, persistent=2, paper_qkv=True),
                                  lambda: TitansMAG(8, heads=2, window=4, chunk_size=4, paper_qkv=True)],
                         ids=["mac", "mag", "mal", "mag-no-persistent-residual", "mal-residual", "mac-paper-qkv",
                              "mag-paper-qkv"])
def test_causal_and_trainable(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 14, 8)
    y = module(x)
    x2 = x.clone()
    x2[:, 9:] += 1.0
    y2 = module(x2)
    assert y.shape == x.shape
    assert torch.allclose(y[:, :9], y2[:, :9], atol=1e-6) and not torch.allclose(y[:, 9:], y2[:, 9:])
    y.square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in module.parameters())


def test_mac_context_mask():
    p, s = 2, 3
    mask = TitansMAC(4, segment=s, persistent=p)._context_mask()[0, 0]
    for row in range(p + 2 * s):
        for col in range(p + 2 * s):
            if row < p:
                want = col <= row
            else:
                pos = (row - p) % s  # position of the row inside the segment (h rows and x rows alike)
                want = col < p or (p <= col < p + s and col - p <= pos) or (row >= p + s and col >= p + s and col - p - s <= pos)
            assert bool(mask[row, col]) == want, (row, col)


def test_mac_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by heads"):
        TitansMAC(10, heads=3)


def test_mag_persistent_tokens_are_seen_by_every_row():
    """§4.2: attention runs over [persistent ‖ x] and every row sees the persistent tokens (SW-Attn*)."""
    module = TitansMAG(8, heads=2, window=4, chunk_size=4, persistent=3)
    mask = module.attention.layout(3 + 20).to_token_mask()[0, 0]
    assert mask[:, :3].tril().equal(torch.ones(23, 3, dtype=torch.bool).tril())  # causal among themselves
    assert mask[3:, :3].all() and not mask[10, 4:6].any() and mask[10, 7:11].all()  # window 4 after them
    for make in (lambda: module, lambda: TitansMAL(8, heads=2, window=4, chunk_size=4, persistent=3)):
        layer = make()
        x = torch.randn(1, 20, 8)
        y = layer(x)
        with torch.no_grad():
            layer.persistent[0] += 1.0
        assert y.shape == x.shape and (layer(x) - y).abs().amax(-1).min() > 0  # every output row changes


def test_persistent_count_checked():
    with pytest.raises(ValueError, match="persistent"):
        TitansMAG(8, persistent=-1)

"""Sparsifiner: attention over the predicted mask through the engine equals a naive masked softmax (forward and
gradients), each patch row keeps exactly ceil(keep_rate * N) keys and the cls row all of them, keep_rate 1 is
dense attention, the reconstruction coefficients are a softmax, bad input is named, and a tiny training run."""
import math

import pytest
import torch

from blockattn.modules.sparsifiner import SparsifinerAttention, SparsifinerPredictor, mask_layout, masked_attention


def naive_masked(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def _qkv(batch=2, heads=3, n=65, d=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=dtype) for _ in range(3)]


def _predictor(n=65, heads=3, d=16, seed=0, **kw):
    torch.manual_seed(seed)
    predictor = SparsifinerPredictor(d, n, heads, **kw)
    with torch.no_grad():  # weights of a trained size, so the masks differ by image
        predictor.down.normal_(0, 1.0)
        predictor.up.normal_(0, 1.0)
    return predictor


@pytest.mark.parametrize("block_size", [16, 13])
def test_engine_equals_naive_masked_softmax_forward_and_backward(block_size):
    q, k, v = (t.requires_grad_() for t in _qkv(seed=1))
    mask = _predictor(seed=1)(q.detach(), k.detach())
    out = masked_attention(q, k, v, mask, block_size=block_size)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = naive_masked(q64, k64, v64, mask)
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_layout_holds_exactly_the_mask():
    mask = torch.rand(2, 3, 50, 50, generator=torch.Generator().manual_seed(2)) < 0.3
    mask[..., 0] = True  # no empty row
    assert torch.equal(mask_layout(mask, 16).to_token_mask(), mask)


@pytest.mark.parametrize("n", [64, 65])
def test_connectivity_is_exactly_the_budget_and_cls_row_dense(n):
    q, k, _ = _qkv(n=n, seed=3)
    mask = _predictor(n=n, seed=3)(q, k)
    keep = math.ceil(0.25 * n)
    assert mask.shape == (2, 3, n, n)
    assert bool((mask[:, :, 1:].sum(-1) == keep).all()) and bool(mask[:, :, 0].all())
    if n == 64:
        assert float(mask[:, :, 1:].float().mean()) == 0.25
    assert not torch.equal(mask[0], mask[1])  # instance dependent


def test_mask_is_top_k_of_the_sparsified_low_rank_map():
    predictor = _predictor(seed=4, coef_topk=3)
    q, k, _ = _qkv(seed=4)
    coef = torch.softmax(predictor.proj_q(q[:, :, 1:]) @ (predictor.proj_k(k).transpose(-1, -2) @ predictor.down)
                         * 3 ** -0.5, -1)
    torch.testing.assert_close(coef, predictor.coefficients(q, k))
    torch.testing.assert_close(coef.sum(-1), torch.ones_like(coef[..., 0]))
    torch.testing.assert_close(predictor.approx(q, k, sparse=False), coef @ predictor.up.t())
    top = coef.topk(3, -1)
    sparse_coef = torch.zeros_like(coef).scatter_(-1, top.indices, top.values)
    basis = predictor.up.t().abs()
    scores = sparse_coef @ (basis * (basis > 0.02))
    want = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(17, -1).indices, True)
    assert torch.equal(predictor(q, k)[:, :, 1:], want)


def test_scale_flag():
    assert _predictor().scale == 3 ** -0.5
    assert _predictor(scale="channels").scale == 8 ** -0.5


def test_keep_rate_one_is_dense_attention():
    torch.manual_seed(5)
    attn = SparsifinerAttention(48, 3, 65, keep_rate=1.0)
    x = torch.randn(2, 65, 48)
    sparse = attn(x)
    attn.mode = "dense"
    torch.testing.assert_close(sparse, attn(x), rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="keep_rate"):
        SparsifinerPredictor(16, 65, 3, keep_rate=0.0)
    with pytest.raises(TypeError, match="keep_rate"):
        SparsifinerPredictor(16, 65, 3, keep_rate="0.25")
    with pytest.raises(ValueError, match="scale"):
        SparsifinerPredictor(16, 65, 3, scale="dim")
    with pytest.raises(TypeError, match="num_tokens"):
        SparsifinerPredictor(16, 65.0, 3)
    q, k, _ = _qkv(n=64)
    with pytest.raises(ValueError, match="q must have shape"):
        _predictor()(q, k)
    with pytest.raises(TypeError, match="q must be"):
        _predictor()(q.numpy(), k)
    with pytest.raises(TypeError, match="mask"):
        mask_layout(torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="mask must be"):
        masked_attention(q, k, k, torch.ones(1, 1, 65, 65, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        masked_attention(q, k, k, None)
    with pytest.raises(ValueError, match="4 dims"):
        mask_layout(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="heads"):
        SparsifinerAttention(50, 3, 65)
    attn = SparsifinerAttention(48, 3, 65)
    with pytest.raises(ValueError, match="x must have shape"):
        attn(torch.randn(2, 65, 32))
    attn.mode = "sparsest"
    with pytest.raises(ValueError, match="mode"):
        attn(torch.randn(2, 65, 48))


def test_tiny_training_is_seeded_and_cli_writes_table_and_png(tmp_path):
    import json

    from blockattn.cli import main
    from blockattn.commands.train import TINY
    from blockattn.modules.sparsifiner_train import train
    tiny = TINY["sparsifiner"]
    first = train(**tiny)
    recon = first["losses"]["recon"]
    assert recon[-1] < recon[0]  # the reconstruction loss falls
    assert first["keys_per_row"] == 17 and set(first["recall"]) == {"predicted", "random", "window", "jaccard"}
    assert main(["train", "sparsifiner", "--tiny", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "sparsifiner.json").read_text())["losses"] == first["losses"]  # seeded
    assert (tmp_path / "sparsifiner.png").exists()
    with pytest.raises(ValueError, match="batch"):
        train(**dict(tiny, batch=64))

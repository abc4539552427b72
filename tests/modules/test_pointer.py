"""Pointer Networks: the additive score written out per position, masking, permutation equivariance,
the teacher-forced decoder against a hand-stepped one, and a tiny sorting run that learns."""
import pytest
import torch

from blockattn.modules import PointerAttention, PointerNetwork


def _naive_scores(att, enc, dec):
    w1, w2, v = att.w1.weight, att.w2.weight, att.v.weight[0]
    return torch.stack([torch.stack([v @ torch.tanh(w1 @ enc[b, j] + w2 @ dec[b]) for j in range(enc.shape[1])])
                        for b in range(enc.shape[0])])


def test_scores_match_formula_forward_and_backward():
    torch.manual_seed(0)
    att = PointerAttention(8)
    enc, dec = torch.randn(3, 5, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    out, ref = att(enc, dec), _naive_scores(att, enc, dec)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [enc, dec, *att.parameters()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # several decoder steps at once equal one step at a time
    decs = torch.randn(3, 4, 8)
    torch.testing.assert_close(att(enc, decs), torch.stack([att(enc, decs[:, t]) for t in range(4)], 1))


def test_scores_are_permutation_equivariant_and_masking_zeroes_probability():
    torch.manual_seed(1)
    att = PointerAttention(6)
    enc, dec = torch.randn(2, 7, 6), torch.randn(2, 6)
    perm = torch.randperm(7)
    torch.testing.assert_close(att(enc[:, perm], dec), att(enc, dec)[:, perm])
    selected = torch.zeros(2, 7, dtype=torch.bool)
    selected[0, 3] = selected[1, 0] = True
    p = att(enc, dec, selected).softmax(-1)
    assert p[0, 3] == 0 and p[1, 0] == 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2))


def test_network_forward_equals_hand_stepped_decoder():
    torch.manual_seed(2)
    net = PointerNetwork(2, 8)
    x = torch.randn(2, 5, 2)
    targets = torch.stack([torch.randperm(5) for _ in range(2)])
    logits = net(x, targets)
    emb = net.embed(x)
    enc, (h, c) = net.encoder(emb)
    state, inp, selected = (h[0], c[0]), net.start.expand(2, -1), torch.zeros(2, 5, dtype=torch.bool)
    for i in range(5):
        state = net.decoder(inp, state)
        ref = _naive_scores(net.pointer, enc, state[0]).masked_fill(selected, float("-inf"))
        torch.testing.assert_close(logits[:, i], ref, rtol=1e-5, atol=1e-5)
        selected = selected.clone()
        selected[torch.arange(2), targets[:, i]] = True
        inp = emb[torch.arange(2), targets[:, i]]
    pred = net.decode(x)
    assert pred.shape == (2, 5) and all(sorted(row.tolist()) == list(range(5)) for row in pred)


def test_learns_to_sort_five_numbers():
    torch.manual_seed(0)
    net = PointerNetwork(1, 32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(80):
        x = torch.rand(64, 5, 1)
        loss = torch.nn.functional.cross_entropy(net(x, x[..., 0].argsort(1)).flatten(0, 1),
                                                 x[..., 0].argsort(1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.rand(256, 5, 1)
    accuracy = (net.decode(x) == x[..., 0].argsort(1)).float().mean()
    assert accuracy > 0.85, accuracy


def test_pointer_errors():
    with pytest.raises(ValueError, match="hidden"):
        PointerAttention(0)
    att = PointerAttention(4)
    with pytest.raises(TypeError, match="encoder must be a torch.Tensor"):
        att(None, torch.randn(1, 4))
    with pytest.raises(ValueError, match="encoder must have shape"):
        att(torch.randn(1, 3, 5), torch.randn(1, 4))
    with pytest.raises(ValueError, match="decoder must have shape"):
        att(torch.randn(1, 3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="selected must be a bool"):
        att(torch.randn(1, 3, 4), torch.randn(1, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="selected must have shape"):
        att(torch.randn(1, 3, 4), torch.randn(1, 4), torch.zeros(1, 4, dtype=torch.bool))
    net = PointerNetwork(1, 4)
    with pytest.raises(ValueError, match="points must have shape"):
        net(torch.randn(2, 3, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be a long"):
        net(torch.randn(2, 3, 1), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="targets must index"):
        net(torch.randn(2, 3, 1), torch.full((2, 3), 3))
    with pytest.raises(ValueError, match="steps"):
        net.decode(torch.randn(2, 3, 1), steps=4)
    with pytest.raises(TypeError, match="dtype"):
        net.decode(torch.randn(2, 3, 1, dtype=torch.float64))

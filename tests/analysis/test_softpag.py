import math

import pytest
import torch

import blockattn
from blockattn.analysis.softpag import (NoiseSchedule, ddim_sample, frechet_distance, head_hunter, perturbed,
                                        softpag_attention)
from blockattn.modules.tiny_dit import PerturbableSelfAttention, TinyDiT
from blockattn.patterns import full


def naive_softpag(q, k, v, u):
    """The paper's rule written out: A_h -> (1 - u_h) softmax(q k^T / sqrt(D)) + u_h I, output A V."""
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    eye = torch.eye(q.shape[2], dtype=q.dtype)
    mixed = (1 - u.view(1, -1, 1, 1)) * probs + u.view(1, -1, 1, 1) * eye
    return mixed @ v


def qkv(seed, shape=(2, 3, 37, 16)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3)]


def test_strength_zero_is_plain_attention_bit_for_bit_and_one_is_identity():
    q, k, v = qkv(0)
    plain = blockattn.attention(q, k, v, full(37))
    assert torch.equal(softpag_attention(q, k, v, 0.0), plain)
    torch.testing.assert_close(softpag_attention(q, k, v, 1.0), v, rtol=1e-6, atol=1e-6)


def test_output_is_linear_in_strength_and_other_heads_are_untouched():
    q, k, v = qkv(1)
    out0, out1 = softpag_attention(q, k, v, 0.0), softpag_attention(q, k, v, 1.0)
    for u in (0.25, 0.7):
        torch.testing.assert_close(softpag_attention(q, k, v, u), (1 - u) * out0 + u * out1, rtol=1e-5, atol=1e-6)
    mixed = softpag_attention(q, k, v, torch.tensor([0.0, 0.6, 0.0]))
    assert torch.equal(mixed[:, [0, 2]], out0[:, [0, 2]])
    torch.testing.assert_close(mixed[:, 1], 0.4 * out0[:, 1] + 0.6 * out1[:, 1], rtol=1e-5, atol=1e-6)


def test_softpag_through_the_engine_matches_the_naive_twin_with_gradients():
    q, k, v = qkv(2, (2, 4, 50, 8))
    u = torch.tensor([0.0, 0.3, 1.0, 0.8])
    out, twin = softpag_attention(q, k, v, u), naive_softpag(q, k, v, u)
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    twin_grads = torch.autograd.grad(twin, (q, k, v), grad_out)
    for g, t in zip(grads, twin_grads):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


def test_softpag_rejects_bad_arguments():
    q, k, v = qkv(3, (1, 2, 5, 4))
    with pytest.raises(ValueError, match="strength"):
        softpag_attention(q, k, v, 1.5)
    with pytest.raises(ValueError, match="strength"):
        softpag_attention(q, k, v, torch.tensor([0.5]))
    with pytest.raises(TypeError, match="strength"):
        softpag_attention(q, k, v, "0.5")
    with pytest.raises(ValueError, match="self-attention"):
        softpag_attention(q, k[:, :, :3], v[:, :, :3], 0.5)
    with pytest.raises(TypeError, match="q"):
        softpag_attention(q.detach().numpy(), k, v, 0.5)


def test_the_dit_attention_module_matches_its_naive_twin():
    torch.manual_seed(0)
    layer = PerturbableSelfAttention(32, 4)
    layer.identity_strength.copy_(torch.tensor([0.0, 0.5, 1.0, 0.2]))
    x = torch.randn(3, 16, 32, requires_grad=True)
    out = layer(x)
    q, k, v = layer.qkv(x).view(3, 16, 3, 4, 8).permute(2, 0, 3, 1, 4)
    twin = layer.proj(naive_softpag(q, k, v, layer.identity_strength).transpose(1, 2).reshape(3, 16, 32))
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=1e-5)
    params = [x] + list(layer.parameters())
    for g, t in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(twin.sum(), params)):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = TinyDiT(dim=16, depth=2, heads=2)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it weights to perturb
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def test_perturbed_sets_and_restores_head_strengths():
    model = tiny_dit()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    base = model(x, t)
    with perturbed(model, [(1, 0)], 0.5):
        assert model.blocks[1].attn.identity_strength.tolist() == [0.5, 0.0]
        assert not torch.allclose(model(x, t), base)
    assert torch.equal(model(x, t), base)
    with pytest.raises(ValueError, match="head"):
        with perturbed(model, [(0, 1), (2, 0)]):
            pass
    assert model.blocks[0].attn.identity_strength.tolist() == [0.0, 0.0]
    with perturbed(model, [(0, 1)], 0.0):
        assert torch.equal(model(x, t), base)


def test_one_ddim_step_applies_pag_guidance():
    model, schedule = tiny_dit(1), NoiseSchedule()
    w, heads = 1.5, [(0, 0), (1, 1)]
    out = ddim_sample(model, schedule, 3, steps=1, guidance=w, heads=heads, strength=0.7, seed=4)
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    t = torch.full((3,), 999)
    with torch.no_grad():
        eps = model(x, t)
        with perturbed(model, heads, 0.7):
            weak = model(x, t)
    guided = eps + w * (eps - weak)
    a = schedule.alpha_bar[999]
    torch.testing.assert_close(out, ((x - (1 - a).sqrt() * guided) / a.sqrt()).clamp(-1, 1))
    plain = ddim_sample(model, schedule, 3, steps=4, seed=4)
    assert torch.equal(ddim_sample(model, schedule, 3, steps=4, guidance=w, heads=heads, strength=0.0, seed=4), plain)
    assert not torch.allclose(ddim_sample(model, schedule, 3, steps=4, guidance=w, heads=heads, seed=4), plain)


def test_head_hunter_returns_the_top_heads_of_an_additive_objective():
    gen = torch.Generator().manual_seed(5)
    heads = [(layer, head) for layer in range(3) for head in range(4)]
    gain = dict(zip(heads, torch.randn(len(heads), generator=gen).tolist()))
    calls = []

    def objective(head_set):
        calls.append(len(head_set))
        return sum(gain[h] for h in head_set)
    result = head_hunter(heads, objective, rounds=4)
    assert result["selected"] == sorted(heads, key=gain.get, reverse=True)[:4]
    assert calls == [1] * 12 + [2] * 11 + [3] * 10 + [4] * 9
    assert head_hunter(heads, objective, rounds=2, per_round=2)["selected"] == result["selected"]
    with pytest.raises(ValueError, match="rounds"):
        head_hunter(heads, objective, rounds=13)


def test_frechet_distance_of_an_affine_copy():
    a = torch.randn(400, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    b = 2 * a + shift
    # cov_b = 4 cov_a, so the trace term is tr(cov_a + 4 cov_a - 2 * 2 cov_a) = tr(cov_a)
    expected = float((a.mean(0) - b.mean(0)).pow(2).sum() + torch.trace(torch.cov(a.T)))
    assert abs(frechet_distance(a, b) - expected) < 1e-8
    assert abs(frechet_distance(a, a)) < 1e-8


def test_a_tiny_diffusion_training_run_lowers_the_loss():
    from blockattn.analysis.softpag import train_dit

    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    _, losses = train_dit(images, NoiseSchedule(), steps=60, batch=16, lr=3e-3, dim=16, depth=1, heads=2)
    assert sum(losses[-15:]) / 15 < 0.9 * sum(losses[:15]) / 15


def test_cli_prints_the_tables_and_writes_the_pictures(tmp_path, capsys):
    pytest.importorskip("sklearn")  # the digits: installed by setup.sh (the "analysis" extra)
    from blockattn.cli import main

    assert main(["train", "softpag", "--tiny", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "HeadHunter" in printed and "confidence" in printed
    for name in ("softpag.json", "softpag_sweep.png", "softpag_samples.png"):
        assert (tmp_path / name).stat().st_size > 0

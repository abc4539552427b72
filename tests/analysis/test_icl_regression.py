import math

import pytest
import torch

from blockattn.analysis.icl_regression import (ICLConfig, MultiHeadSoftmaxICL, best_step, debiased_gd, kq_ov,
                                               pattern_stats, ridge, sample_prompts, train, vanilla_gd)


def naive_forward(model, z, z_q):
    """The paper's single-layer multi-head softmax attention written out: per head, softmax over the n
    context tokens of (W_Q z_q).(W_K z_l) / sqrt(d+1), weights on W_V z_l, then W_O over the heads."""
    width = model.d + 1
    outs = []
    for h in range(model.heads):
        rows = slice(h * width, (h + 1) * width)
        q = z_q @ model.q_proj.weight[rows].T
        k = z @ model.k_proj.weight[rows].T
        v = z @ model.v_proj.weight[rows].T
        p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(width), dim=-1)
        outs.append((p @ v)[:, 0])
    return torch.cat(outs, -1) @ model.o_proj.weight[0]


def test_prompts_follow_the_linear_model():
    gen = torch.Generator().manual_seed(0)
    z, z_q, y_q = sample_prompts(4, 12, 3, noise_var=0.0, generator=gen)
    assert z.shape == (4, 12, 4) and z_q.shape == (4, 1, 4) and y_q.shape == (4,)
    assert torch.all(z_q[..., -1] == 0)
    x, y = z[..., :-1], z[..., -1]
    w = torch.linalg.lstsq(x, y.unsqueeze(-1)).solution.squeeze(-1)  # noiseless: the pairs determine w
    torch.testing.assert_close(y_q, (w * z_q[:, 0, :-1]).sum(-1), rtol=1e-4, atol=1e-4)
    again = sample_prompts(4, 12, 3, noise_var=0.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((z, z_q, y_q), again))


def test_prompt_statistics_are_the_papers():
    z, _, y_q = sample_prompts(4000, 8, 5, noise_var=0.1, generator=torch.Generator().manual_seed(1))
    x, y = z[..., :-1], z[..., -1]
    assert abs(float(x.var()) - 1) < 0.03
    # w ~ N(0, I/d): E|w|^2 = 1, so var(y) = 1 + noise variance
    assert abs(float(y.var()) - 1.1) < 0.05 and abs(float(y_q.var()) - 1.1) < 0.08


def test_prompt_arguments_are_checked():
    with pytest.raises(ValueError, match="n"):
        sample_prompts(2, 0, 3)
    with pytest.raises(TypeError, match="batch"):
        sample_prompts(2.0, 4, 3)
    with pytest.raises(ValueError, match="noise_var"):
        sample_prompts(2, 4, 3, noise_var=-1.0)


def test_gd_predictors_are_one_gradient_step_from_zero():
    z, z_q, _ = sample_prompts(6, 10, 4, generator=torch.Generator().manual_seed(2))
    x, y, x_q = z[..., :-1].double(), z[..., -1].double(), z_q[:, 0, :-1].double()
    step = 0.7
    for predictor, centred in ((debiased_gd, True), (vanilla_gd, False)):
        w = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
        xs = x - x.mean(1, keepdim=True) if centred else x
        ys = y - y.mean(1, keepdim=True) if centred else y
        loss = ((ys - (xs * w.unsqueeze(1)).sum(-1)) ** 2).sum() / (2 * x.shape[1])
        (grad,) = torch.autograd.grad(loss, w)
        direct = ((w - step * grad) * x_q).sum(-1)
        torch.testing.assert_close(predictor(z.double(), z_q.double(), step), direct)


def test_best_step_minimises_the_error():
    z, z_q, y_q = sample_prompts(500, 20, 5, generator=torch.Generator().manual_seed(3))
    step = best_step(debiased_gd, z, z_q, y_q)

    def mse(s):
        return float((debiased_gd(z, z_q, s) - y_q).pow(2).mean())
    assert mse(step) < mse(step * 1.05) and mse(step) < mse(step * 0.95)
    assert float((ridge(z, z_q) - y_q).pow(2).mean()) < mse(step)  # the Bayes predictor is best


@pytest.mark.parametrize("heads,n", [(1, 7), (2, 40), (3, 70)])
def test_model_through_the_engine_matches_the_naive_twin(heads, n):
    torch.manual_seed(heads)
    model = MultiHeadSoftmaxICL(d=4, heads=heads)
    z, z_q, y_q = sample_prompts(5, n, 4, generator=torch.Generator().manual_seed(n))
    out = model(z, z_q)
    twin = naive_forward(model, z, z_q)
    torch.testing.assert_close(out, twin, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out - y_q).pow(2).sum(), list(model.parameters()))
    twin_grads = torch.autograd.grad((twin - y_q).pow(2).sum(), list(model.parameters()))
    for g, t in zip(grads, twin_grads):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-5)


def test_model_rejects_bad_inputs():
    model = MultiHeadSoftmaxICL(d=3, heads=2)
    z, z_q, _ = sample_prompts(2, 5, 3)
    with pytest.raises(ValueError, match="z"):
        model(z[..., :3], z_q)
    with pytest.raises(ValueError, match="z_q"):
        model(z, z_q[:1])
    with pytest.raises(TypeError, match="z"):
        model(z.numpy(), z_q)


def _paired_heads(d, omega, mu):
    """Two heads built by hand in the paper's pattern: KQ x-block = +-omega I, OV = +-mu on y only."""
    model = MultiHeadSoftmaxICL(d=d, heads=2)
    width = d + 1
    eye_x = torch.diag(torch.tensor([1.0] * d + [0.0]))
    e_y = torch.zeros(width, width)
    e_y[-1, -1] = 1.0
    with torch.no_grad():
        model.q_proj.weight.copy_(torch.cat([omega * math.sqrt(width) * eye_x, -omega * math.sqrt(width) * eye_x]))
        model.k_proj.weight.copy_(torch.cat([torch.eye(width)] * 2))
        model.v_proj.weight.copy_(torch.cat([e_y] * 2))
        o = torch.zeros(1, 2 * width)
        o[0, width - 1], o[0, -1] = mu, -mu
        model.o_proj.weight.copy_(o)
    return model


def test_pattern_stats_read_a_hand_built_pair():
    stats = pattern_stats(*kq_ov(_paired_heads(4, 0.1, 2.0)))
    assert [round(h["omega"], 6) for h in stats["heads"]] == [0.1, -0.1]
    assert [round(h["mu"], 6) for h in stats["heads"]] == [2.0, -2.0]
    for h in stats["heads"]:
        assert h["offdiag"] < 1e-6 and h["spread"] < 1e-6 and h["y_share"] < 1e-6 and h["last_share"] > 1 - 1e-6
    assert stats["zero_sum"] < 1e-6 and abs(stats["effective_step"] - 0.4) < 1e-6


def test_paired_heads_are_debiased_gd_to_first_order():
    z, z_q, _ = sample_prompts(200, 30, 4, generator=torch.Generator().manual_seed(4))
    errors = []
    for omega in (0.02, 0.01):
        model = _paired_heads(4, omega, 0.5 / omega)  # effective step sum mu omega = 1
        with torch.no_grad():
            errors.append(float((model(z, z_q) - debiased_gd(z, z_q, 1.0)).abs().max()))
    assert errors[0] < 0.05 and errors[1] < errors[0] * 0.6  # the gap shrinks with omega (second order)


def test_a_tiny_training_run_lowers_the_loss():
    config = ICLConfig(d=3, n=12, batch=64, steps=60, lr=1e-2)
    _, losses = train(2, config, seed=0)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_cli_prints_the_tables_and_writes_the_pictures(tmp_path, capsys):
    from blockattn.cli import main

    assert main(["train", "icl_regression", "--tiny", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "zero-sum" in printed and "debiased gd (tuned)" in printed
    for name in ("icl_regression.json", "icl_regression_patterns.png", "icl_regression_error.png"):
        assert (tmp_path / name).stat().st_size > 0

"""DMA: the keep rule equals brute-force causal top-w of the bias, the folded bias equals an explicit-bias
softmax forward and backward, gradients reach A and W_dt, and w >= L is plain causal attention + bias."""
import pytest
import torch

from blockattn.modules.dma import DMAAttention, keep_thresholds


def naive_keep(bias, window):
    """bool [B, H, L, L]: row i keeps the `window` largest bias values among keys 0..i (all if i < window)."""
    batch, heads, length = bias.shape
    keep = torch.zeros(batch, heads, length, length, dtype=torch.bool)
    for i in range(length):
        if i + 1 <= window:
            keep[..., i, :i + 1] = True
        else:
            top = bias[..., :i + 1].topk(window, dim=-1).indices
            keep[..., i, :].scatter_(-1, top, True)
    return keep


def naive_dma(q, k, v, bias, keep):
    """Explicit softmax(scale q k^T + b) over the kept keys; GQA by repeating."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    b, keep = bias.repeat_interleave(group, 1), keep.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + b.unsqueeze(-2)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v


def _module(window, form="linear", seed=0):
    torch.manual_seed(seed)
    module = DMAAttention(2, 8, window=window, form=form, block_size=8).double()
    with torch.no_grad():
        module.A.normal_(0, 1.0)  # a bias large enough to matter
    return module


def _inputs(length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, length, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2)]


def test_thresholds_give_the_brute_force_top_w():
    bias = torch.randn(2, 3, 150, dtype=torch.float64)
    tau = keep_thresholds(bias, 10)
    rows = torch.arange(150).view(-1, 1)
    threshold_rule = (torch.arange(150).view(1, -1) <= rows) & (bias.unsqueeze(-2) >= tau.unsqueeze(-1))
    assert torch.equal(threshold_rule, naive_keep(bias, 10))


@pytest.mark.parametrize("form", ["linear", "exp"])
def test_layout_is_the_causal_top_w_and_output_matches_explicit_bias(form):
    module = _module(6, form)
    q, k, v = _inputs(40, seed=1)
    layout, bias = module.select(v, 4)
    keep = naive_keep(bias.detach(), 6)
    assert torch.equal(layout.to_token_mask(), keep.repeat_interleave(2, 1))
    torch.testing.assert_close(module(q, k, v), naive_dma(q, k, v, bias, keep), rtol=1e-10, atol=1e-10)


def test_gradients_match_explicit_bias_reference():
    module = _module(6)
    q, k, v = (t.requires_grad_() for t in _inputs(40, seed=2))
    module(q, k, v).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)] + [module.A.grad.clone(), module.dt_proj.weight.grad.clone()]
    assert float(got[3].abs().sum()) > 0 and float(got[4].abs().sum()) > 0
    for t in (q, k, v, module.A, module.dt_proj.weight):
        t.grad = None
    bias = module.key_bias(v)
    naive_dma(q, k, v, bias, naive_keep(bias.detach(), 6)).square().sum().backward()
    want = [q.grad, k.grad, v.grad, module.A.grad, module.dt_proj.weight.grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_fp32_default_backend_matches():
    module = _module(6).float()
    q, k, v = (t.float() for t in _inputs(64, seed=3))
    bias = module.key_bias(v)
    torch.testing.assert_close(module(q, k, v), naive_dma(q, k, v, bias, naive_keep(bias.detach(), 6)),
                               rtol=1e-5, atol=1e-5)


def test_window_at_least_length_is_dense_plus_bias():
    module = _module(40)
    q, k, v = _inputs(40, seed=4)
    bias = module.key_bias(v)
    causal = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 2, 40, 40)
    torch.testing.assert_close(module(q, k, v), naive_dma(q, k, v, bias, causal), rtol=1e-10, atol=1e-10)


def test_group_heads_share_mask_and_bias():
    module = _module(5)
    _, _, v = _inputs(30, seed=5)
    layout, _ = module.select(v, 4)
    mask = layout.to_token_mask()
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 2], mask[:, 3])


def test_bad_input():
    with pytest.raises(ValueError, match="window"):
        DMAAttention(2, 8, window=0)
    with pytest.raises(ValueError, match="form"):
        DMAAttention(2, 8, form="relu")
    q, k, v = _inputs(16)
    with pytest.raises(ValueError, match="expected q"):
        DMAAttention(3, 8)(q, k, v)


def test_training_is_seeded_and_cli_writes_table_and_png(tmp_path):
    from blockattn.cli import main
    from blockattn.modules.dma_train import train
    tiny = dict(steps=3, batch=4, train_examples=40, test_examples=20, seq_len=32, vocab=64, num_kv_pairs=2, window=4)
    first, second = (train("dma", **tiny) for _ in range(2))
    assert first["losses"] == second["losses"] and set(first["mask_recall"]) == {"dma", "random", "window"}
    assert main(["train", "dma", "--tiny", "--window", "4", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "dma.json").exists() and (tmp_path / "dma.png").exists()
    with pytest.raises(ValueError, match="model kind"):
        train("sparse", **tiny)


def test_answer_recall_keeps_every_value_position_when_the_window_covers_the_sequence():
    from blockattn.bench.mqar import multiquery_ar
    from blockattn.modules.dma_train import answer_recall, build_model
    inputs, labels = (torch.as_tensor(t) for t in multiquery_ar(8, vocab_size=64, input_seq_len=32, num_kv_pairs=2))
    torch.manual_seed(0)
    full = answer_recall(build_model("dma", vocab=64, window=32), inputs, labels, 2)
    assert full["kept"] == 1.0 and full["lookalikes"] > 0
    torch.manual_seed(0)
    tight = answer_recall(build_model("dma", vocab=64, window=2), inputs, labels, 2)
    assert 0.0 <= tight["kept"] < 1.0


def test_bias_reads_every_kv_heads_value_at_its_own_token_only():
    """As modeling_doge.py: dt_proj sees the concatenated values of all KV heads at token j, nothing else."""
    module = _module(6)
    _, _, v = _inputs(12, seed=6)
    want = module.A.view(1, -1, 1) * torch.nn.functional.softplus(
        torch.einsum("bhld,ohd->bol", v, module.dt_proj.weight.view(2, 2, 8)))
    torch.testing.assert_close(module.key_bias(v), want, rtol=1e-12, atol=1e-12)
    nudged = v.clone()
    nudged[:, 1, 5] += 1.0  # head 1's value at token 5
    changed = (module.key_bias(nudged) - module.key_bias(v)).abs() > 0
    assert changed[:, :, 5].all() and not changed[:, :, :5].any() and not changed[:, :, 6:].any()


def test_position_embeddings_put_each_position_into_the_values_and_cli_passes_them(tmp_path):
    """The paper's MQAR model (Zoology, max_position_embeddings = L) adds a learned embedding per position,
    so the same token at two positions reaches the first DMA bias with different values."""
    import json
    from blockattn.cli import main
    from blockattn.modules.dma_train import build_model
    torch.manual_seed(0)
    model = build_model("dma", vocab=16, window=4, positions=8)
    captured = []
    model.blocks[0].mixer.register_forward_pre_hook(lambda m, args: captured.append(args[2]))
    model(torch.full((1, 8), 3))
    assert not torch.allclose(captured[0][:, :, 4], captured[0][:, :, 6])
    torch.manual_seed(0)
    plain = build_model("dma", vocab=16, window=4)
    captured.clear()
    plain.blocks[0].mixer.register_forward_pre_hook(lambda m, args: captured.append(args[2]))
    plain(torch.full((1, 8), 3))  # no positions, and the 4-wide conv sees the same 4 tokens: equal values
    torch.testing.assert_close(captured[0][:, :, 4], captured[0][:, :, 6])
    with pytest.raises(ValueError, match="embeds at most 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert main(["train", "dma", "--tiny", "--length", "48", "--pairs", "3", "--no-position-embeddings",
                 "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "dma.json").read_text())
    settings = {(r["seq_len"], r["num_kv_pairs"], r["vocab"], r["position_embeddings"]) for r in rows}
    assert settings == {(48, 3, 128, False)}

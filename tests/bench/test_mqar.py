"""MQAR data against Zoology's definition, causality of every registered mixer, the command's table/plot."""
import json
import math
import types

import numpy as np
import pytest
import torch

from blockattn.bench import mqar
from blockattn.commands import mqar as mqar_command


def test_examples_follow_the_definition():
    vocab, length, pairs = 64, 32, 4
    inputs, labels = mqar.multiquery_ar(200, vocab_size=vocab, input_seq_len=length, num_kv_pairs=pairs, seed=3)
    assert inputs.shape == labels.shape == (200, length) and inputs.dtype == torch.int64
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert all(1 <= key < vocab // 2 for key in keys) and len(set(keys)) == pairs
        assert all(vocab // 2 <= val < vocab for val in values) and len(set(values)) == pairs
        answer = dict(zip(keys, values))
        asked = [t for t in range(length) if y[t] != mqar.IGNORE]
        assert len(asked) == pairs
        assert sorted(x[t] for t in asked) == sorted(keys)
        for t in asked:
            assert t >= 2 * pairs and (t - 2 * pairs) % 2 == 0
            assert y[t] == answer[x[t]]
    assert (labels[:, : 2 * pairs] == mqar.IGNORE).all()


def test_non_queries_are_zero_without_random_fill():
    inputs, labels = mqar.multiquery_ar(50, vocab_size=64, input_seq_len=32, num_kv_pairs=4, random_non_queries=False)
    filler = (labels == mqar.IGNORE)
    filler[:, :8] = False
    assert (inputs[filler] == 0).all()


def test_query_gaps_follow_the_power_law():
    pairs, length = 2, 40
    _, labels = mqar.multiquery_ar(3000, vocab_size=64, input_seq_len=length, num_kv_pairs=pairs, seed=1)
    gaps = ((labels != mqar.IGNORE).nonzero()[:, 1] - 2 * pairs) // 2
    space = (length - 2 * pairs) // 2
    counts = np.bincount(gaps.numpy(), minlength=space)
    # p(i) ∝ i^(a−1) with a = 0.01 falls off nearly as 1/i: the first slot is the most frequent
    # and the near slots together dominate, unlike a uniform placement (each slot ≈ 1/space).
    assert counts.argmax() == 0
    assert counts[: space // 4].sum() > counts[3 * space // 4:].sum() * 2


def test_seeds_differ_and_repeat():
    a = mqar.multiquery_ar(20, vocab_size=64, input_seq_len=32, num_kv_pairs=4, seed=0)
    b = mqar.multiquery_ar(20, vocab_size=64, input_seq_len=32, num_kv_pairs=4, seed=0)
    c = mqar.multiquery_ar(20, vocab_size=64, input_seq_len=32, num_kv_pairs=4, seed=1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_seq_len=33), "input_seq_len must be even"),
    (dict(vocab_size=32), "vocab_size must exceed input_seq_len"),
    (dict(num_kv_pairs=9), r"num_kv_pairs \* 4 must be <= input_seq_len"),
    (dict(power_a=0.0), r"power_a must lie in \(0, 1\]"),
    (dict(num_kv_pairs=0), "num_kv_pairs must be a positive int"),
])
def test_bad_generator_arguments(kwargs, message):
    args = dict(vocab_size=64, input_seq_len=32, num_kv_pairs=4) | kwargs
    with pytest.raises(ValueError, match=message):
        mqar.multiquery_ar(5, **args)


@pytest.mark.parametrize("mixer", sorted(mqar.MIXERS))
def test_every_mixer_is_causal(mixer):
    torch.manual_seed(0)
    model = mqar.MQARModel(mixer, vocab_size=64, d_model=8, seq_len=32).eval()
    tokens = torch.randint(0, 64, (2, 32))
    changed = tokens.clone()
    changed[:, 20:] = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert a.shape == (2, 32, 64)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_unknown_mixer():
    with pytest.raises(ValueError, match="mixer must be one of"):
        mqar.MQARModel("mamba", vocab_size=64, d_model=16, seq_len=32)


def test_accuracy_counts_only_queries():
    class Oracle(torch.nn.Module):
        def forward(self, tokens):
            return torch.nn.functional.one_hot(self.answer, 64).float()
    inputs, labels = mqar.multiquery_ar(10, vocab_size=64, input_seq_len=32, num_kv_pairs=4)
    model = Oracle()
    model.answer = labels.clamp(min=0)
    assert mqar.accuracy(model, inputs, labels) == 1.0
    model.answer = (labels.clamp(min=0) + 1) % 64
    assert mqar.accuracy(model, inputs, labels) == 0.0


def test_command_tabulates_and_plots_saved_results(tmp_path, capsys):
    results = [{"mixer": m, "d_model": d, "accuracy": acc, "seconds": 1.0, "params": 1, "steps": 1}
               for m, d, acc in [("attention", 16, 0.5), ("attention", 32, 0.99), ("linear", 16, 0.1)]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    args = types.SimpleNamespace(mixers=["attention"], load=[str(path), str(path)], plot=str(tmp_path / "acc.png"),
                                 json=str(tmp_path / "merged.json"))
    mqar_command.run(args)
    assert json.loads((tmp_path / "merged.json").read_text()) == results * 2
    out = capsys.readouterr().out
    assert "| attention | 0.500 | 0.990 |" in out and "| linear | 0.100 |  |" in out
    assert (tmp_path / "acc.png").stat().st_size > 1000


TINY = dict(vocab_size=32, seq_len=16, num_kv_pairs=2, train_examples=96, test_examples=20, epochs=2, batch_size=32)


def test_harness_trains_a_tiny_config():
    config = mqar.MQARConfig(**TINY)
    result = mqar.train_mqar("attention", 8, config)
    assert result["mixer"] == "attention" and result["d_model"] == 8 and result["steps"] == 6
    assert 0.0 <= result["accuracy"] <= 1.0 and result["params"] > 0 and result["seconds"] >= 0
    assert result["settings"] == dict(TINY, lr=mqar.default_lr(8), seed=config.seed)
    assert mqar.train_mqar("attention", 8, config)["accuracy"] == result["accuracy"]  # seeded


def test_default_mixers_are_registered_and_leave_out_the_memory_mixers():
    assert set(mqar.DEFAULT_MIXERS) < set(mqar.MIXERS)
    assert {"attention", "sliding_window", "linear", "based"} <= set(mqar.DEFAULT_MIXERS)
    assert not any(m.startswith(("titans", "moneta", "yaad", "memora")) for m in mqar.DEFAULT_MIXERS)


def test_default_config_is_a_valid_mqar_task_with_a_short_window():
    config = mqar.MQARConfig()
    x, y = mqar.multiquery_ar(50, vocab_size=config.vocab_size, input_seq_len=config.seq_len,
                              num_kv_pairs=config.num_kv_pairs)
    assert x.shape == (50, config.seq_len)
    # key position of pair j is 2j; most key-query distances are far beyond the sliding window
    rows, cols = (y != mqar.IGNORE).nonzero(as_tuple=True)
    key_pos = [(x[r, :2 * config.num_kv_pairs:2] == x[r, c]).nonzero().item() * 2 for r, c in zip(rows, cols)]
    distance = cols - torch.tensor(key_pos)
    assert (distance >= mqar.WINDOW).float().mean() > 0.9


def test_command_trains_and_writes_json(tmp_path, capsys):
    import argparse
    parser = argparse.ArgumentParser()
    mqar_command.add_arguments(parser)
    assert parser.parse_args([]).mixers == mqar.DEFAULT_MIXERS
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    args = parser.parse_args(["--mixers", "attention", "linear", "--d-models", "8", "--json", str(tmp_path / "r.json"),
                              *flags])
    mqar_command.run(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [(r["mixer"], r["d_model"]) for r in saved] == [("attention", 8), ("linear", 8)]
    assert "| attention |" in capsys.readouterr().out


def test_tnl_slope_schedule_matches_transnormerllm():
    # lightning-attention `_build_slope_tensor`: 8 heads 1/2 .. 1/256; 2 heads 1/16, 1/256; 6 heads interleave 8's
    assert mqar.alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert mqar.alibi_slopes(2) == pytest.approx([1 / 16, 1 / 256])
    assert mqar.alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    first, last = mqar.tnl_decays(2, 0, 2), mqar.tnl_decays(2, 1, 2)
    assert first == pytest.approx((0.9394, 0.9961), abs=1e-4) and all(1 - d < 1e-6 for d in last)
    layer = mqar.MQARModel("lightning", vocab_size=32, d_model=8, seq_len=16).mixers[1]
    assert layer.gate is not None and torch.allclose(layer.decay, torch.tensor(last))


def test_rat_forget_gate_starts_near_the_official_085():
    mixer = mqar.RATMixer(512)
    forget = torch.sigmoid(mixer.forget(torch.zeros(1, 1, 512)))  # the bias alone: σ(log U(1, 15))
    assert abs(forget.mean().item() - (1 - math.log(8) / 14)) < 0.03  # E[u / (1 + u)] = 0.851
    assert abs(torch.sigmoid(mqar.RATMixer(512, paper=False).forget.bias).mean().item() - 0.5) < 0.03


def test_rat_mixer_uses_the_official_layer_parts():
    mixer = mqar.RATMixer(8, chunk_size=4)
    assert mixer.gate is not None and mixer.paper  # output gate; chunk RoPE is tested with the op
    assert not hasattr(mqar.RATMixer(8, paper=False), "gate")


def test_block_transformer_mixer_sees_order_inside_earlier_blocks():
    torch.manual_seed(0)
    x = torch.randn(1, 16, 8)
    shuffled = x.clone()
    shuffled[:, 4:8] = x[:, [5, 7, 4, 6]]  # permute block 1
    for embedder, order_matters in (("concat", True), ("mean", False)):
        mixer = mqar.BlockTransformerMixer(8, embedder=embedder)
        with torch.no_grad():
            a, b = mixer(x), mixer(shuffled)
        assert torch.allclose(a[:, :4], b[:, :4])
        # later blocks see block 1 only through its context: the mean embedder cannot tell the orders apart
        assert torch.allclose(a[:, 8:], b[:, 8:], atol=1e-6) != order_matters


def test_based_layers_follow_the_official_layout():
    model = mqar.MQARModel("based", vocab_size=32, d_model=8, seq_len=16)
    assert isinstance(model.mixers[0], mqar.TaylorLinearMixer)
    window = model.mixers[1]
    assert isinstance(window, mqar.SoftmaxMixer) and window.window == mqar.WINDOW + 1  # W previous keys + self
    zoology = mqar.MQARModel("based_zoology", vocab_size=32, d_model=8, seq_len=16)
    assert isinstance(zoology.mixers[0], mqar.BaseConvMixer) and isinstance(zoology.mixers[1], mqar.TaylorLinearMixer)

"""bench.harness / metrics / eval_plots on a tiny random Llama: the passkey cells equal the unpatched
model's own answers for dense, a window that cannot see the needle never finds it, plots are written,
and bad method specs are refused."""
import dataclasses
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn.bench import eval_plots, harness, metrics, tasks  # noqa: E402


class Digits:
    """Tokenizer stand-in: one token per character (enough for passkey prompts)."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [min(ord(c), 127) for c in text]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors else ids})()


def copy_model():
    """A tiny random 1-layer Llama (GQA: 2 query heads, 1 key head)."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_parse_method():
    assert harness.parse_method("dense") == ("dense", {})
    assert harness.parse_method("streaming:window=64,sink=2") == ("streaming", {"window": 64, "sink": 2})
    with pytest.raises(ValueError, match="known methods"):
        harness.parse_method("nope")
    with pytest.raises(TypeError, match="does not take"):
        harness.parse_method("dense:window=3")
    with pytest.raises(ValueError, match="key=value"):
        harness.parse_method("streaming:64")


def test_run_eval_cells_match_unpatched_model_and_outputs(tmp_path):
    model, tok = copy_model(), Digits()
    config = harness.EvalConfig(lengths=(256, 320), depths=(0.1, 0.9), quality_layers=(0,), decode_prompt=64,
                                decode_tokens=3, backend="torch")
    results = harness.run_eval(model, tok, ["dense:block_size=32", "streaming:window=32,block_size=32"], config,
                               progress=False)
    dense, stream = results["methods"]
    assert "error" not in dense and "error" not in stream
    for cell in dense["cells"]:
        sample = tasks.passkey(tok, cell["length"], cell["depth"], seed=cell["seed"])
        assert cell["found"] == tasks.answer_found(model, sample)[0]
    assert dense["density"] == pytest.approx(1.0) and stream["density"] < 0.6
    assert dense["layer_quality"]["output_error"] < 1e-5 and dense["layer_quality"]["recall"] == pytest.approx(1.0)
    assert stream["layer_quality"]["recall"] < 1.0 and stream["layer_quality"]["output_error"] > 1e-3
    assert dense["decode_tokens_per_s"] > 0 and dense["prefill_speedup"] > 0
    table = harness.format_table(results)
    assert "passkey@256" in table and "streaming(window=32,block_size=32)" in table
    paths = eval_plots.heatmaps(results, str(tmp_path))
    paths.append(eval_plots.pareto(results, str(tmp_path / "pareto.png")))
    assert len(paths) == 3 and all(os.path.getsize(p) > 1000 for p in paths)
    json.dumps(results, default=str)


def test_multi_needle_and_perplexity_tasks():
    model, tok = copy_model(), Digits()
    config = harness.EvalConfig(tasks=("multi_needle", "perplexity"), lengths=(256,), depths=(0.5,), needles=3,
                                quality_layers=(0,), decode_prompt=32, decode_tokens=2, backend="torch")
    results = harness.run_eval(model, tok, ["dense:block_size=32", "sliding_window:window=16,block_size=32"],
                               config, progress=False)
    dense, window = results["methods"]
    assert [c["task"] for c in dense["cells"]] == ["multi_needle"] * 3
    for ask, cell in enumerate(dense["cells"]):  # each fact asked once, answers equal the unpatched model's
        sample = tasks.multi_needle(tok, 256, needles=3, ask=ask, seed=0)
        assert cell["found"] == tasks.answer_found(model, sample)[0]
    assert set(dense["task_accuracy"]) == {"multi_needle"}
    # perplexity against the unpatched model: the full layout changes nothing, a 16-token window does
    assert abs(dense["perplexity"]["nll_delta_mean"]) < 1e-5
    assert window["perplexity"]["nll_delta_max"] > 1e-3
    table = harness.format_table(results)
    assert "needles@256" in table and "passkey@" not in table and "ppl (dense -> method)" in table
    assert eval_plots.heatmaps(results, "/nonexistent") == []  # no passkey cells: no heatmap


def test_time_budget_runs_the_first_method_and_lists_the_rest_as_not_run(tmp_path):
    model, tok = copy_model(), Digits()
    config = harness.EvalConfig(lengths=(256,), depths=(0.5,), quality_layers=(0,), decode_prompt=32,
                                decode_tokens=2, backend="torch", budget_seconds=1e-6)
    results = harness.run_eval(model, tok, ["dense:block_size=32", "streaming:window=32,block_size=32"], config,
                               progress=False)
    dense, stream = results["methods"]
    assert dense["cells"] and "skipped" not in dense
    assert not stream["cells"] and "time budget" in stream["skipped"]
    assert "not run: past the" in harness.format_table(results)
    assert len(eval_plots.heatmaps(results, str(tmp_path))) == 1  # no heatmap for a method that did not run


def test_bad_tasks_are_refused():
    model, tok = copy_model(), Digits()
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(256,), tasks=("riddles",)), progress=False)
    with pytest.raises(ValueError, match="'passkey' or 'multi_needle'"):
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(256,), tasks=("perplexity",)),
                         progress=False)
    with pytest.raises(ValueError, match="encoder=\\(model, tokenizer\\)"):
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(256,), tasks=("passkey", "encoder")),
                         progress=False)


def test_command_task_names_match_the_harness():
    from blockattn.commands import eval as eval_command
    assert eval_command.TASKS == harness.TASKS


def test_a_method_that_cannot_run_is_refused_before_any_work_and_a_later_failure_is_recorded(monkeypatch):
    model, tok = copy_model(), Digits()
    config = harness.EvalConfig(lengths=(300,), depths=(0.5,), quality_layers=(0,), decode_prompt=32,
                                decode_tokens=2, backend="torch")
    timed = []
    monkeypatch.setattr(harness.tasks, "answer_found", lambda *a: timed.append(1) or (True, 1.0))
    with pytest.raises(ValueError, match="cannot run on LlamaForCausalLM.*backend"):
        harness.run_eval(model, tok, [("dense", {})], dataclasses.replace(config, backend="nope"), progress=False)
    assert not timed  # refused before the first timed prefill
    monkeypatch.undo()
    # an error inside one method's run (here in its decode-speed step) is recorded in its row, cells kept
    monkeypatch.setattr(harness.metrics, "decode_tokens_per_second", lambda *a, **k: 1 / 0)
    results = harness.run_eval(model, tok, [("dense", {})], config, progress=False)
    assert "ZeroDivisionError" in results["methods"][0]["error"] and results["methods"][0]["cells"]
    assert "dense stopped early: " in harness.format_table(results)
    results["methods"][0]["cells"] = []
    assert "failed" in harness.format_table(results)


def test_lengths_beyond_context_and_bad_depths_are_refused():
    model, tok = copy_model(), Digits()
    with pytest.raises(ValueError, match="context of 2048"):
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(4096,)), progress=False)
    with pytest.raises(ValueError, match="no room for the answer.*at most 2032"):  # prompt + answer must fit
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(2040,)), progress=False)
    with pytest.raises(ValueError, match="depths"):
        harness.run_eval(model, tok, ["dense"], harness.EvalConfig(lengths=(300,), depths=(2.0,)), progress=False)


def test_decode_tokens_per_second_rejects_bad_count():
    with pytest.raises(ValueError, match="new_tokens"):
        metrics.decode_tokens_per_second(copy_model(), torch.zeros(1, 4, dtype=torch.long), new_tokens=1)


def hybrid_model():
    """A tiny random Gemma 3: sliding (window 64) and full layers, 2 query heads, 1 key head."""
    config = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           sliding_window=64, max_position_embeddings=1024, pad_token_id=0,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


def test_hybrid_model_two_baselines_full_layer_density_memory_and_per_length_rows():
    model, tok = hybrid_model(), Digits()
    config = harness.EvalConfig(lengths=(256, 320), depths=(0.5,), decode_prompt=32, decode_tokens=2,
                                perplexity_tail=64, backend="torch")
    results = harness.run_eval(model, tok, ["dense", "streaming:window=32,block_size=32"], config, progress=False)
    dense, stream = results["methods"]
    assert results["hybrid_full_layers"] == [1] and results["config"]["quality_layers"] == [1]
    # the structure-only baseline is the dense row itself; the SDPA baseline is the unpatched model
    assert results["baseline_structure_seconds"] == {n: dense["per_length"][n]["seconds"] for n in (256, 320)}
    assert all(row["speedup_structure"] == 1.0 for row in dense["per_length"].values())
    assert stream["prefill_speedup_structure"] > 0 and stream["prefill_speedup"] > 0
    # density of the full-attention layer only: dense keeps all its tiles, streaming does not
    assert dense["density"] == pytest.approx(1.0) and dense["density_all_layers"] < 1.0
    assert stream["density"] < 1.0
    # perplexity at every length on the last 64 tokens, against the unpatched model
    for n in (256, 320):
        assert abs(dense["per_length"][n]["perplexity"]["nll_delta_mean"]) < 1e-5
        assert stream["per_length"][n]["perplexity"]["nll_delta_max"] > 1e-4
    assert dense["perplexity"] == dense["per_length"][320]["perplexity"]
    assert 0.01 < dense["peak_rss_gib"] < 64 and 0.01 < results["baseline_sdpa_peak_rss_gib"][256] < 64
    table = harness.format_length_table(results)
    assert "| unpatched (SDPA) | 256 |" in table and "| streaming(window=32,block_size=32) | 320 |" in table
    assert "vs structure" in harness.format_table(results)


def test_structure_baseline_is_measured_when_dense_is_not_run():
    model, tok = hybrid_model(), Digits()
    config = harness.EvalConfig(tasks=("passkey",), lengths=(256,), depths=(0.5,), decode_prompt=32,
                                decode_tokens=2, backend="torch")
    results = harness.run_eval(model, tok, ["streaming:window=32,block_size=32"], config, progress=False)
    assert results["baseline_structure_seconds"][256] > 0
    assert results["methods"][0]["prefill_speedup_structure"] > 0


def test_default_lengths_follow_the_context_and_peak_rss_sees_an_allocation():
    assert harness.default_lengths(copy_model()) == (2032,)  # 2048 positions: the longest prompt + answer
    big = copy_model()
    big.config.max_position_embeddings = 32768
    assert harness.default_lengths(big) == (8192, 16384, 32000)
    big.config.max_position_embeddings = 8192
    assert harness.default_lengths(big) == (2048, 4096, 8000)
    with harness.PeakRSS(every=0.001) as quiet:
        pass
    with harness.PeakRSS(every=0.001) as busy:
        block = torch.ones(64, 2 ** 20)  # 256 MiB, freed before the block ends
        del block
    assert busy.gib > quiet.gib + 0.2

"""bench.harness / metrics / eval_plots on a tiny random Llama: the passkey cells equal the unpatched
model's own answers for dense, a window that cannot see the needle never finds it, plots are written,
and bad method specs are refused."""
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


def test_a_method_that_raises_is_recorded_not_fatal():
    model, tok = copy_model(), Digits()
    config = harness.EvalConfig(lengths=(300,), depths=(0.5,), quality_layers=(0,), decode_prompt=32,
                                decode_tokens=2, backend="torch")
    # an engine error inside one method's run (here an unknown backend) is recorded in its row
    results = harness.run_eval(model, tok, [("dense", {})], harness.EvalConfig(**{**config.__dict__,
                                                                                  "backend": "nope"}),
                               progress=False)
    assert "backend" in results["methods"][0]["error"]
    assert "failed" in harness.format_table(results)
    # an error after some cells were scored keeps the cells and is named under the table
    results["methods"][0]["cells"] = [{"task": "passkey", "length": 300, "depth": 0.5, "found": True, "seconds": 1.0}]
    assert "dense stopped early: " in harness.format_table(results)


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

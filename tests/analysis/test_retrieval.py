"""Retrieval scores (Wu et al. 2024): the copy-paste rule against the official loop, the needle span and
prompt, the success filter, and `blockattn heads` at a tiny size."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from blockattn import analysis, cli, hf  # noqa: E402
from blockattn.analysis import retrieval  # noqa: E402


def byte_tokenizer(alphabet=None):
    """A byte-level tokenizer (one token per byte; `alphabet` keeps only those bytes' tokens) + <eos>."""
    chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()) if alphabet is None else list(alphabet)
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<eos>"] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def word_tokenizer(text):
    """A word-level tokenizer over the words of `text` (one token per word or punctuation run)."""
    pre = tokenizers.pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *words])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")


def tiny_llama(vocab, seed=0, max_pos=512):
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def official_loop(top, emitted, prompt_ids, span):
    """retrieval_calculate's loops (topk = 1): a hit per (layer, head)."""
    start, end = span
    hits = torch.zeros(top.shape, dtype=torch.bool)
    for layer in range(top.shape[0]):
        for head in range(top.shape[1]):
            i = int(top[layer, head])
            if start <= i < end and emitted == int(prompt_ids[i]):
                hits[layer, head] = True
    return hits


def test_copy_paste_hits_equal_the_official_loop():
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 5, (60,), generator=gen)
    for _ in range(20):
        top = torch.randint(0, 70, (6, 9), generator=gen)  # positions past the prompt are generated tokens
        emitted, span = int(torch.randint(0, 5, (1,), generator=gen)), (10, 30)
        got = retrieval.copy_paste_hits(top, emitted, prompt, span)
        assert torch.equal(got, official_loop(top, emitted, prompt, span))
    assert got.dtype == torch.bool


def test_score_sample_equals_eager_official_decode():
    """Greedy decode with eager attention maps (the official way) and the hook API give one score."""
    tok = byte_tokenizer("abcd")
    model = tiny_llama(4, seed=1)  # the model never emits <eos> (id 4): every step can copy
    eager = transformers.LlamaForCausalLM(model.config).eval()
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    prompt = torch.randint(0, 4, (1, 40), generator=torch.Generator().manual_seed(2))
    span = (0, 40)
    with hf.patch(model, "dense"), torch.no_grad():
        got, response = retrieval._score_sample(model, tok, prompt, span, 12, 2, 4)
    want = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        cache = eager(prompt[:, :-1], use_cache=True).past_key_values
        token, emitted = prompt[:, -1:], []
        for _ in range(12):
            out = eager(token, past_key_values=cache, use_cache=True, output_attentions=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            top = torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions])
            want += official_loop(top, int(token), prompt[0], span).double() / 40
            emitted.append(int(token))
            if int(token) == tok.eos_token_id:
                break
    assert response == tok.decode(emitted, skip_special_tokens=True).strip()
    torch.testing.assert_close(got, want)
    assert want.sum() > 0  # some copy events happened: the comparison is not vacuous


def test_needle_span_and_prompt():
    ids = torch.tensor([5, 1, 2, 3, 4, 9, 9])
    assert retrieval.find_needle_span(ids, [1, 2, 3]) == (1, 4)
    ids = torch.tensor([0] * 5 + list(range(7, 18)) + [0, 0])
    answer = list(range(7, 18))  # 11 distinct tokens: 10 of them already cover > 90%
    assert retrieval.find_needle_span(ids, answer) == (4, 15)  # one token early, as the official rule has it
    assert retrieval.find_needle_span(ids, answer[:-1] + [99]) == (4, 15)
    assert retrieval.find_needle_span(ids, answer[:-2] + [98, 99]) is None
    needle = retrieval.NEEDLES[0]
    filler = "One sentence here. Another one follows it. " * 60
    question = retrieval.QUESTION.format(question=needle.question)
    tok = word_tokenizer(filler + needle.needle + question)
    haystack = tok(filler, add_special_tokens=False).input_ids
    answer = tok(needle.answer, add_special_tokens=False).input_ids
    for depth in (0, 40, 100):
        prompt, (s, e) = retrieval.needle_prompt(tok, needle, 600, depth, haystack)
        ids = prompt[0].tolist()
        assert len(ids) == 600 - 200 + len(tok(question, add_special_tokens=False).input_ids)
        exact = next(i for i in range(len(ids)) if ids[i:i + len(answer)] == answer)
        assert e - s == len(answer) and s <= exact <= s + len(answer) // 10  # up to 10% early, as the official rule
        needle_ids = tok(" " + needle.needle, add_special_tokens=False).input_ids
        at = next(i for i in range(len(ids)) if ids[i:i + len(needle_ids)] == needle_ids)
        # at a sentence break (at 100% depth: appended to the end)
        assert depth == 100 or at == 0 or tok.convert_ids_to_tokens(ids[at - 1]) == "."
    with pytest.raises(ValueError, match="no room"):
        retrieval.needle_prompt(tok, needle, 210, 50, haystack)


def test_rouge1_recall():
    assert retrieval.rouge1_recall("Eat a sandwich, in the park", "they eat a SANDWICH.") == pytest.approx(3 / 6)
    assert retrieval.rouge1_recall("a a b", "a b") == pytest.approx(2 / 3)
    assert retrieval.rouge1_recall("", "x") == 0.0


def test_failed_samples_are_not_counted_and_bad_input():
    tok = byte_tokenizer()
    model = tiny_llama(len(tok))
    result = analysis.retrieval_search(model, tok, lengths=[400], depths=[50], max_new_tokens=3,
                                       needles=retrieval.NEEDLES[:2])
    assert result.scores.shape == (2, 4) and len(result.samples) == 2
    assert result.counted == 0 and not result.scores.any()  # a random model retrieves nothing: nothing counts
    assert not hasattr(model, "_blockattn_previous")  # patched for the search only
    planted = retrieval.RetrievalResult(torch.tensor([[0.0, 0.5, 0.2, 0.0], [0.3, 0.0, 0.0, 0.9]]), [])
    assert torch.equal(planted.kv_head_scores(2), torch.tensor([[0.5, 0.2], [0.3, 0.9]]))
    assert planted.retrieval_heads() == [(1, 3), (0, 1), (1, 0), (0, 2)]
    with pytest.raises(ValueError, match="kv_heads"):
        planted.kv_head_scores(3)
    with pytest.raises(ValueError, match="lengths"):
        analysis.retrieval_scores(model, tok, lengths=[100])
    with pytest.raises(ValueError, match="depths"):
        analysis.retrieval_scores(model, tok, depths=[120])
    with pytest.raises(TypeError, match="needles"):
        analysis.retrieval_scores(model, tok, needles=["x"])
    with pytest.raises(TypeError, match="scores"):
        retrieval.masking_check(model, tok, [0.5])


def test_heads_command_writes_table_heatmap_and_mask_check(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tok = byte_tokenizer()
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    png, saved = tmp_path / "heads.png", tmp_path / "heads.json"
    assert cli.main(["heads", "--model", str(folder), "--lengths", "400", "--depths", "1", "--max-new-tokens", "2",
                     "--top", "3", "--out", str(png), "--save", str(saved), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 layers x 4 query heads" in out and "rank  layer  head" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert torch.tensor(json.loads(saved.read_text())["scores"]).shape == (2, 4)
    assert cli.main(["heads", "--model", str(folder), "--scores", str(saved), "--mask-check", "--mask-lengths", "300",
                     "--mask-depths", "50", "--draws", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "passkey" in out and "multi_needle" in out and "random 1" in out
    assert cli.main(["heads", "--model", str(tmp_path / "missing")]) == 2

"""The transfer intervention (wrong-color attention at the last position) against a plain o_proj pre-hook
twin on a tiny random Llama."""
import pytest
import torch

from blockattn.analysis import circuit_reuse, circuits

from .tiny_lm import WordTokenizer
from .tiny_lm import tiny_llama as _tiny_llama


def tiny_llama():
    return _tiny_llama(vocab=4999, positions=512)


def color_tokenizer():  # a vocabulary large enough that the colors do not collide
    return WordTokenizer(4999, hashed=True)


def test_attend_to_foils_equals_a_plain_twin():
    model, tok = tiny_llama(), color_tokenizer()
    prompts = circuits.colored_objects_prompts(3, shots=1)
    heads = [(0, 3), (1, 1)]
    got = circuit_reuse.attend_to_foils(model, tok, heads, prompts)
    diffs = []
    for p in prompts:
        words = p.text.split()
        ids = torch.tensor([tok(p.text).input_ids])
        where = [max(i for i, w in enumerate(words) if w == c) for c in p.candidates if c != p.answer]
        values = {}
        handles = [blk.self_attn.v_proj.register_forward_hook(lambda m, a, o, l=l: values.__setitem__(l, o.clone()))
                   for l, blk in enumerate(model.model.layers)]
        with torch.no_grad():
            model(ids)  # the values at earlier positions do not depend on the edit at the last one
        for handle in handles:
            handle.remove()

        def pre(l):
            def f(module, args):
                x = args[0].clone()
                for layer, head in heads:
                    if layer == l:
                        kv = head // 2
                        x[0, -1, head * 8:(head + 1) * 8] = values[l][0, where, kv * 8:(kv + 1) * 8].mean(0)
                return (x,)
            return f
        handles = [blk.self_attn.o_proj.register_forward_pre_hook(pre(l)) for l, blk in enumerate(model.model.layers)]
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        for handle in handles:
            handle.remove()
        answer = logits[circuits.word_id(tok, p.answer)]
        others = torch.stack([logits[circuits.word_id(tok, c)] for c in p.candidates if c != p.answer])
        diffs.append(float(answer - others.max()))
    assert got["logit_diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    plain = circuits.task_metrics(circuits.last_logits(model, tok, prompts), tok, prompts)
    assert plain["logit_diff"] != pytest.approx(got["logit_diff"], abs=1e-4)


def test_colored_corruption_is_aligned_and_hides_the_answer():
    clean = circuits.colored_objects_prompts(12, shots=2, fmt="qa")
    corrupt = circuits.colored_objects_prompts(12, shots=2, fmt="qa", corrupt=True)
    for a, b in zip(clean, corrupt):
        qa, qb = a.text.split("Q: ")[-1], b.text.split("Q: ")[-1]
        assert len(a.text.split()) == len(b.text.split()) and (a.answer, a.foil) == (b.answer, b.foil)
        assert a.answer in qa.split() and a.answer not in qb.split() and not set(a.candidates) & set(qb.split())
        assert a.text.split("Q: ")[:-1] == b.text.split("Q: ")[:-1]  # the solved examples stay
    with pytest.raises(ValueError, match="fmt"):
        circuits.colored_objects_prompts(2, fmt="poem")


def test_is_list_wording_binds_color_after_object():
    for p in circuits.colored_objects_prompts(10, fmt="is_list", shots=0):
        asked = p.text.split(". The ")[-1].split(" is")[0]
        assert f"the {asked} is {p.answer}" in p.text and p.text.endswith(f"The {asked} is")

"""The task prompts: IOI and colored objects, and the official sae-circuits data (data/ioi.py's templates and
counterfactuals, written out plainly here) with Wang et al.'s ABC corruption."""
import random

import pytest

from blockattn.analysis import circuit_prompts


def official_abba(templates):
    """data/ioi.py's character loop that turns BABA templates into ABBA ones."""
    out = list(templates)
    for i in range(len(out)):
        first_clause = True
        for j in range(1, len(out[i]) - 1):
            if out[i][j - 1:j + 2] == "[B]" and first_clause:
                out[i] = out[i][:j] + "A" + out[i][j + 1:]
            elif out[i][j - 1:j + 2] == "[A]" and first_clause:
                first_clause = False
                out[i] = out[i][:j] + "B" + out[i][j + 1:]
    return out


def test_abba_templates_are_the_official_loop():
    assert list(circuit_prompts.ABBA_TEMPLATES) == official_abba(circuit_prompts.BABA_TEMPLATES)
    assert len(circuit_prompts.BABA_TEMPLATES) == 15


def official_texts(template, n1, n2, n3, place, obj):
    """gen_prompt_counterfact for one draw, then the final token (the IO, one token) dropped."""
    prompt = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    prompt1 = prompt.replace("[A]", n1).replace("[B]", n2)
    prompt2 = prompt.replace("[A]", n3).replace("[B]", n2).replace(n2, n1, 1)
    return prompt1.rsplit(" ", 1)[0], prompt2.rsplit(" ", 1)[0]


def test_prompts_and_counterfactuals_are_the_official_rule():
    rng = random.Random(5)
    names = circuit_prompts.OFFICIAL_NAMES
    checked = 0
    for template in circuit_prompts.ABBA_TEMPLATES + circuit_prompts.BABA_TEMPLATES:
        for _ in range(8):
            n1, n2, n3, *fresh = rng.sample(names, 6)
            if any(a != b and a in b for a in (n1, n2, n3) for b in (n1, n2, n3)):
                continue  # str.replace would hit a longer name (our replacement is by whole word)
            place, obj = rng.choice(circuit_prompts.OFFICIAL_PLACES), rng.choice(circuit_prompts.OFFICIAL_OBJECTS)
            text, counter, abc = circuit_prompts.ioi_texts(template, n1, n2, n3, place, obj, fresh)
            assert (text, counter) == official_texts(template, n1, n2, n3, place, obj)
            # Wang et al.'s ABC: same words everywhere but the names; three fresh names, subject distinct
            assert len(abc.split()) == len(text.split())
            diff = [(a, b) for a, b in zip(text.split(), abc.split()) if a != b]
            assert {b.rstrip(".,") for _, b in diff} == set(fresh) and n1 not in abc and n2 not in abc
            checked += 1
    assert checked > 150
    prompts, counters, abcs = circuit_prompts.ioi_dataset(40, seed=3)
    assert len(prompts) == len(counters) == len(abcs) == 40
    assert {p.kind for p in prompts} == {"ABBA", "BABA"}
    for p, c in zip(prompts, counters):
        assert len(p.text.split()) == len(c.text.split())
        assert c.text.split()[-3:] == p.text.split()[-3:] or c.text.split()[-4:] == p.text.split()[-4:]
        words = [w.rstrip(".,") for w in c.text.split()]
        assert p.foil in words and p.answer in words and p.text.count(p.foil) == 2 and c.text.count(p.foil) == 1


def test_ioi_prompts():
    for kind in ("ABBA", "BABA"):
        for p in circuit_prompts.ioi_prompts(20, kind, seed=2):
            assert p.answer != p.foil and p.answer in circuit_prompts.NAMES and p.foil in circuit_prompts.NAMES
            words = p.text.replace(",", " ").replace(".", " ").split()
            assert words.count(p.answer) == 1 and words.count(p.foil) == 2  # IO once, S twice
            assert p.text.endswith(" to") or p.text.endswith(" it to")
    for p in circuit_prompts.ioi_prompts(20, "ABC"):
        names = [w for w in p.text.replace(",", " ").replace(".", " ").split() if w in circuit_prompts.NAMES]
        assert len(names) == 3 and len(set(names)) == 3
    with pytest.raises(ValueError, match="kind"):
        circuit_prompts.ioi_prompts(3, "AAB")
    with pytest.raises(TypeError, match="n must be an int"):
        circuit_prompts.ioi_prompts(2.0)


def test_colored_objects_prompts():
    for p in circuit_prompts.colored_objects_prompts(15, shots=2):
        question = p.text.split("\n")[-1]
        assert len(p.text.split("\n")) == 3 and question.endswith("Answer:")
        asked = question.split("What color is the ")[1].split("?")[0]
        assert any(f" {p.answer} {asked}{end}" in question for end in (",", " ", "."))
        assert len(set(p.candidates)) == 3 and p.answer in p.candidates
    for p in circuit_prompts.colored_objects_prompts(15, negative=True, shots=0):
        asked = p.text.split("What color is the ")[1].split("?")[0]
        assert f" {asked}," not in p.text and f" {asked} and" not in p.text and f" {asked}." not in p.text

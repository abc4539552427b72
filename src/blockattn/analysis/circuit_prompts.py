"""The task prompts of the circuit analyses, generated offline: indirect object identification (the
official sae-circuits data, data/ioi.py, and an older 5-template generator with independent ABC negatives)
and colored objects (Ippolito & Callison-Burch style, several wordings), each with its negatives and its
token-aligned corrupted twin for path patching. `circuits` re-exports every name here."""
from __future__ import annotations

import random
from typing import NamedTuple

NAMES = ("Mary John Tom James Anna Sarah David Paul Lisa Kate Mark Emma Peter Laura Alice Bob Jack Susan Robert "
         "Linda Michael Daniel Rachel Steve Kevin Amy Sam Chris Jessica George").split()
PLACES = "store park school office garden beach restaurant hospital station house".split()
GIFTS = "drink book ring kiss bone letter basketball apple".split()
IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {obj} to",
    "After {A} and {B} went to the {place}, {S} gave a {obj} to",
    "Then, {A} and {B} had a long day at the {place}. {S} gave a {obj} to",
    "While {A} and {B} were working at the {place}, {S} handed a {obj} to",
    "Friends {A} and {B} found a {obj} at the {place}. {S} gave it to",
)
# data/ioi.py: BABA_TEMPLATES (the trailing " [A]", the IO token the model must predict, is dropped later)
BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)
# ABBA twins: the first clause's [B] and [A] swap (the official loop over characters does exactly this)
ABBA_TEMPLATES = tuple(t.replace("[B]", "[X]", 1).replace("[A]", "[B]", 1).replace("[X]", "[A]", 1)
                       for t in BABA_TEMPLATES)
# data/ioi.py's NAMES that are one token with a leading space for SmolLM2 (the official code rejects the
# others with the same test, for GPT-2's tokenizer); PLACES and OBJECTS as there
OFFICIAL_NAMES = tuple("""Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James
Robert John Joseph Andrew Ryan Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather
Eric Elizabeth Adam Melissa Kevin Steven Thomas Timothy Christina Rachel Laura Lauren Richard Jeffrey Amy Crystal
Michelle Jeremy Benjamin Mark Emily Aaron Charles Rebecca Jacob Stephen Patrick Sean Erin Jamie Kelly Samantha
Nathan Sara Paul Angela Tyler Scott Katherine Andrea Gregory Mary Lisa Kenneth Bryan Jose Alexander Jesse Katie
Shannon Christine Allison Bradley Samuel""".split())
OFFICIAL_PLACES = "store garden restaurant school hospital office house station".split()
OFFICIAL_OBJECTS = "ring kiss bone basketball computer necklace drink snack".split()
COLORS = "red blue green yellow black white purple orange pink brown".split()
OBJECTS = "pen cup book ball key phone hat bag box plate shoe lamp coin sock fork bowl clock".split()
SURFACES = "table desk floor shelf".split()
COLOR_TEMPLATE = "On the {surface}, I see {items}. What color is the {ask}? Answer:"
COLOR_FORMATS = {  # wordings tried on SmolLM2 (docs/bench/analysis_circuits.md, stop 11)
    "answer": COLOR_TEMPLATE,
    "qa": "Q: On the {surface}, I see {items}. What color is the {ask}?\nA:",  # BIG-bench's Q:/A: form
    "statement": "On the {surface}, I see {items}. The {ask} is",
    "color_of": "On the {surface}, I see {items}. The color of the {ask} is",
    "is_list": "On the {surface}, {items}. The {ask} is",  # items as "the pen is red": color after object
}
ITEM_FORMATS = {"is_list": "the {object} is {color}"}  # every other wording: "a red pen"

OFFICIAL_PROMPTS = 250  # data/ioi.py: n_prompts (positives; as many counterfactual negatives)


class Prompt(NamedTuple):
    """One task prompt. `answer` is the right next word (IO name / color), `foil` the word it competes with
    (the subject / the most likely other listed color is chosen at scoring time); `candidates` are all the
    words the task could answer with (the two names / the listed colors)."""
    text: str
    answer: str
    foil: str
    candidates: tuple[str, ...]
    kind: str


# ------------------------------------------------------------------------------------------- prompts
def _count(name, n):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")


def ioi_prompts(n: int, kind: str = "ABBA", *, seed: int = 0, templates=IOI_TEMPLATES) -> list[Prompt]:
    """`n` IOI prompts. ABBA: "When A and B ..., B gave a drink to" (answer A); BABA: "When B and A ..., B gave
    ..." (answer A); ABC: "When A and B ..., C gave ..." (three distinct names: nothing to identify, the
    negative set; `answer` A, `foil` B are kept only to score it the same way)."""
    _count("n", n)
    if kind not in ("ABBA", "BABA", "ABC"):
        raise ValueError(f"kind must be 'ABBA', 'BABA' or 'ABC', got {kind!r}")
    rng = random.Random(f"ioi-{kind}-{seed}")
    prompts = []
    for i in range(n):
        io, s, c = rng.sample(NAMES, 3)
        first, second = (io, s) if kind in ("ABBA", "ABC") else (s, io)
        text = templates[i % len(templates)].format(A=first, B=second, S=c if kind == "ABC" else s,
                                                    place=rng.choice(PLACES), obj=rng.choice(GIFTS))
        prompts.append(Prompt(text, io, s, (io, s), kind))
    return prompts


def _replace_first_word(text, old, new):
    """The first whole-word `old` -> `new` (the official `str.replace(old, new, 1)`, which could also hit a
    longer name containing `old`, e.g. "Sara" in "Sarah")."""
    words = text.split(" ")
    for i, w in enumerate(words):
        stripped = w.rstrip(".,")
        if stripped == old:
            words[i] = new + w[len(stripped):]
            break
    return " ".join(words)


def ioi_dataset(n: int = OFFICIAL_PROMPTS, *, seed: int = 0, names=OFFICIAL_NAMES, templates=None):
    """The official IOI data (data/ioi.py `gen_prompt_counterfact`): `n` prompts, each from a random template
    of the 15 BABA + 15 ABBA ones, two distinct random names (IO = name_1 for [A], S = name_2 for [B]) and
    random place / object, with the final IO token dropped; returns (prompts, counterfactuals, abc):
    - counterfactuals (the SAE negatives): the same template and nouns with [A] -> name_3, [B] -> S, then
      the first S -> IO, so the subject S is kept and the first clause holds C and IO (no duplicate name);
    - abc (Wang et al. 2022's p_ABC, the corrupted run for path patching): the same template and nouns with
      three fresh distinct names for the first [A], first [B] and the subject, so the sentence is token for
      token aligned with its prompt and identifies nobody.
    `answer`/`foil` are IO/S of the prompt on all three (the counterfactual and ABC are scored the same way)."""
    _count("n", n)
    templates = tuple(ABBA_TEMPLATES + BABA_TEMPLATES) if templates is None else tuple(templates)
    rng = random.Random(f"ioi-official-{seed}")
    prompts, counterfactuals, abc = [], [], []
    for _ in range(n):
        template = rng.choice(templates)
        kind = "ABBA" if template in ABBA_TEMPLATES else "BABA"
        io, s = rng.sample(names, 2)
        c = rng.choice([x for x in names if x not in (io, s)])
        place, obj = rng.choice(OFFICIAL_PLACES), rng.choice(OFFICIAL_OBJECTS)
        fresh = rng.sample([w for w in names if w not in (io, s)], 3)
        text, counter, corrupt = ioi_texts(template, io, s, c, place, obj, fresh)
        prompts.append(Prompt(text, io, s, (io, s), kind))
        counterfactuals.append(Prompt(counter, io, s, (io, s), "counterfactual"))
        abc.append(Prompt(corrupt, io, s, (io, s), "ABC"))
    return prompts, counterfactuals, abc


def ioi_texts(template: str, io: str, s: str, c: str, place: str, obj: str, fresh) -> tuple[str, str, str]:
    """One template filled: (prompt, counterfactual, ABC) texts without the final IO token (see `ioi_dataset`);
    `fresh` are the ABC's three names for the first [A], the first [B] and the subject."""
    base = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    if not base.endswith(" [A]"):
        raise ValueError(f"template must end with ' [A]' (the IO the model predicts), got {template!r}")
    base = base[:-len(" [A]")]
    x, y, z = fresh
    return (base.replace("[A]", io).replace("[B]", s),
            _replace_first_word(base.replace("[A]", c).replace("[B]", s), s, io),
            base.replace("[A]", x, 1).replace("[B]", y, 1).replace("[B]", z).replace("[A]", x))


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def colored_objects_prompts(n: int, *, negative: bool = False, seed: int = 0, count: int = 3,
                            shots: int = 3, fmt: str = "answer", corrupt: bool = False) -> list[Prompt]:
    """`n` colored-objects prompts with `count` distinct colored objects; the answer is the asked object's
    color. `negative`: the question asks about an object that is not on the surface (nothing to find).
    `shots` solved examples (fixed, from their own seed) precede each question: zero-shot SmolLM2-135M
    answers "Answer:" with no color at all (measured: top-1 0/40), 3-shot it names one (40% right, chance 33%).
    `fmt` picks the wording (`COLOR_FORMATS`). `corrupt`: the same prompts (same draws, token for token
    aligned) with the question's listed colors replaced by `count` other colors, so the asked color is
    absent (the corrupted run of path patching, as Wang et al.'s ABC for IOI); answer/foil stay the clean ones."""
    _count("n", n)
    _count("count", count)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be an int >= 0, got {shots!r}")
    if fmt not in COLOR_FORMATS:
        raise ValueError(f"fmt must be one of {sorted(COLOR_FORMATS)}, got {fmt!r}")
    demos = _colored(shots, False, random.Random("colored-shots"), count, fmt)
    prefix = "".join(f"{d.text} {d.answer}\n" for d in demos)
    prompts = _colored(n, negative, random.Random(f"colored-{negative}-{seed}"), count, fmt,
                       corrupt=f"colored-corrupt-{negative}-{seed}" if corrupt else None)
    return [p._replace(text=prefix + p.text) for p in prompts]


def _colored(n, negative, rng, count, fmt="answer", corrupt=None):
    prompts = []
    for i in range(n):
        colors = rng.sample(COLORS, count)
        objects = rng.sample(OBJECTS, count + 1)
        listed = colors
        if corrupt is not None:  # its own generator: the clean draws above stay the same
            listed = random.Random(f"{corrupt}-{i}").sample([c for c in COLORS if c not in colors], count)
        item = ITEM_FORMATS.get(fmt)
        shown = [item.format(object=o, color=c) if item else f"{_article(c)} {c} {o}" for c, o in zip(listed, objects)]
        items = ", ".join(shown[:-1]) + " and " + shown[-1] if count > 1 else shown[0]
        target = rng.randrange(count)
        ask = objects[count] if negative else objects[target]
        text = COLOR_FORMATS[fmt].format(surface=rng.choice(SURFACES), items=items, ask=ask)
        foil = colors[(target + 1) % count] if count > 1 else colors[target]
        kind = "corrupt" if corrupt is not None else "negative" if negative else "positive"
        prompts.append(Prompt(text, colors[target], foil, tuple(colors), kind))
    return prompts


def task_prompts(task: str, n: int, *, seed: int = 0, colored=None) -> tuple[list[Prompt], list[Prompt]]:
    """(positives, negatives), `n` each: IOI is the official data (`ioi_dataset`: prompts and their matched
    counterfactuals); colored objects asks about a listed object against an absent one (`colored`: keyword
    arguments of `colored_objects_prompts`, e.g. fmt / shots / count)."""
    if task == "ioi":
        prompts, counterfactuals, _ = ioi_dataset(n, seed=seed)
        return prompts, counterfactuals
    if task == "colored_objects":
        colored = colored or {}
        return (colored_objects_prompts(n, seed=seed, **colored),
                colored_objects_prompts(n, negative=True, seed=seed, **colored))
    raise ValueError(f"task must be 'ioi' or 'colored_objects', got {task!r}")

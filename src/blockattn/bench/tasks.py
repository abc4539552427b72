"""Long-context tasks on real models, offline: passkey retrieval, multi-needle retrieval, retrieval of
facts hidden in real prose (`retrieval_prose`, the hard one), long-document perplexity (on Python's own
`pydoc_data/topics.py`) and encoder embedding fidelity (MiniLM).

Passkey follows Mohtashami & Jaggi, "Landmark Attention" (2023): a random number is hidden at a given
depth of repetitive filler text and asked for at the end. Answers are scored by greedy decoding
forced onto the answer tokens in one forward pass: the sample counts as found only if every answer
token is the model's argmax (what greedy generation would produce), so no generate() loop is needed.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time

import torch

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def document_text(n_chars: int, *, seed: int = 0) -> str:
    """`n_chars` of real English text from Python's documentation, starting at a seed-chosen topic."""
    import pydoc_data.topics as topics
    pages = list(topics.topics.values())
    start = random.Random(seed).randrange(len(pages))
    text, i = [], start
    while sum(map(len, text)) < n_chars:
        text.append(pages[i % len(pages)])
        i += 1
    return "\n\n".join(text)[:n_chars]


def _check_fraction(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_length(tokenizer, length, model=None):
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise ValueError(f"length must be an int >= 64 tokens, got {length!r}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"length {length} exceeds the model's context of {limit} tokens (max_position_embeddings)")


@dataclasses.dataclass
class Sample:
    """Prompt ids `[1, L]` followed by the answer ids `[1, A]`; `depth` in [0, 1] places the needle."""
    prompt: torch.Tensor
    answer: torch.Tensor
    length: int
    depth: float
    seed: int
    task: str = "passkey"
    needles: tuple = ()     # retrieval_prose: (start, stop) token span of each needle in the prompt
    asked: int | None = None  # retrieval_prose: the index of the asked needle


def _fill(tokenizer, head_ids, needle_ids, tail_ids, length, depth, filler_ids):
    body = length - len(head_ids) - len(needle_ids) - len(tail_ids)
    if body < 1:
        raise ValueError(f"length {length} is too short for the needle and the question")
    reps = filler_ids * (body // len(filler_ids) + 1)
    body_ids = reps[:body]
    cut = int(round(depth * body))
    return head_ids + body_ids[:cut] + needle_ids + body_ids[cut:] + tail_ids


def passkey(tokenizer, length: int, depth: float, *, seed: int = 0, filler: str = FILLER,
            key_line: str = KEY_LINE, question: str = QUESTION, digits: int = 5, model=None) -> Sample:
    """A passkey prompt of exactly `length` tokens with the key line at `depth` (0 = start, 1 = end)."""
    _check_length(tokenizer, length, model)
    _check_fraction("depth", depth)
    if "{key}" not in key_line:
        raise ValueError("key_line must contain '{key}'")
    key = str(random.Random(seed * 7919 + length).randrange(10 ** (digits - 1), 10 ** digits))
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    head = enc("There is important info hidden inside a lot of irrelevant text. Find it and memorize it. ")
    ids = _fill(tokenizer, head, enc(key_line.format(key=key)), enc(" " + question.strip()), length, depth,
                enc(filler))
    return Sample(torch.tensor([ids]), torch.tensor([enc(" " + key)]), length, depth, seed)


def multi_needle(tokenizer, length: int, *, needles: int = 4, ask: int | None = None, seed: int = 0,
                 model=None) -> Sample:
    """`needles` facts "The value of <name> is <number>." spread evenly through real documentation text;
    the question asks for one of them (`ask`, else a seeded choice)."""
    _check_length(tokenizer, length, model)
    if isinstance(needles, bool) or not isinstance(needles, int) or needles < 1:
        raise ValueError(f"needles must be a positive int, got {needles!r}")
    rng = random.Random(seed)
    names = rng.sample(["alpha", "bravo", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo",
                        "juniper", "kestrel", "lantern"], min(needles, 12))
    while len(names) < needles:
        names.append(f"item{len(names)}")
    values = [str(rng.randrange(10000, 99999)) for _ in names]
    ask = rng.randrange(needles) if ask is None else ask
    if not 0 <= ask < needles:
        raise ValueError(f"ask must be in [0, {needles}), got {ask}")
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    question = enc(f"\nQuestion: what is the value of {names[ask]}? Answer: the value of {names[ask]} is")
    facts = [enc(f"\nThe value of {n} is {v}.\n") for n, v in zip(names, values)]
    body = length - len(question) - sum(map(len, facts))
    if body < needles:
        raise ValueError(f"length {length} is too short for {needles} needles")
    text = enc(document_text(body * 8, seed=seed))
    if len(text) < body:
        raise ValueError(f"not enough documentation text for {length} tokens")
    text = text[:body]
    ids, step = [], body // needles
    for i, fact in enumerate(facts):
        ids += text[i * step:(i + 1) * step] + fact
    ids += text[needles * step:] + question
    return Sample(torch.tensor([ids]), torch.tensor([enc(" " + values[ask])]), length, ask / max(1, needles - 1), seed,
                  task="multi_needle")


FIRST_NAMES = ("Mira", "Tobias", "Elena", "Rafael", "Ingrid", "Kofi", "Yuki", "Anders", "Leila", "Dmitri",
               "Priya", "Matteo", "Sofia", "Henrik", "Amara", "Lucas", "Noor", "Felix", "Zara", "Oskar")
LAST_NAMES = ("Castellan", "Whitford", "Okonkwo", "Lindqvist", "Moreau", "Tanaka", "Brennan", "Vasquez",
              "Halloran", "Petrov", "Achebe", "Sorensen", "Delacroix", "Nakamura", "Ferreira", "Gallagher")
PROSE_FACT = "The access code of {name} is"
PROSE_QUESTION = "\n\nQuestion: what is the access code of {name}?\nAnswer: The access code of {name} is"


def retrieval_prose(tokenizer, length: int, depth: float, *, needles: int = 4, seed: int = 0, digits: int = 6,
                    model=None) -> Sample:
    """Facts in real prose: `needles` lines "The access code of <name> is <number>." (distinct names and
    numbers) inserted at line boundaries of Python's documentation (the perplexity task's text), the asked
    fact at `depth` and the others evenly spread; the prompt ends with a question in completion form,
    "... Answer: The access code of <name> is", and the answer is " <number>".

    Harder than `passkey`: the filler is real, varied text (not a repeated sentence the model can skip),
    and the distractor facts share the template, so the model must bind the asked name to its number.
    The prompt's token ids are the concatenation of the prose, needle and question ids, with the answer
    ids inside the needle exactly as scored; `Sample.needles` holds each needle's `(start, stop)` token
    span and `Sample.asked` which one is asked. No number appears in the text outside its own needle."""
    _check_length(tokenizer, length, model)
    _check_fraction("depth", depth)
    if isinstance(needles, bool) or not isinstance(needles, int) or not 1 <= needles <= len(FIRST_NAMES):
        raise ValueError(f"needles must be an int in [1, {len(FIRST_NAMES)}], got {needles!r}")
    if isinstance(digits, bool) or not isinstance(digits, int) or not 3 <= digits <= 12:
        raise ValueError(f"digits must be an int in [3, 12], got {digits!r}")
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    # one seeded draw per prompt (the same seed and length give the same prose, the depth varies the facts)
    rng = random.Random(f"retrieval_prose:{seed}:{length}:{depth!r}")
    prose = document_text(length * 8, seed=seed)
    names = [f"{first} {last}" for first, last in zip(rng.sample(FIRST_NAMES, needles),
                                                      rng.sample(LAST_NAMES * 2, needles))]
    codes = []
    while len(codes) < needles:  # distinct numbers that occur nowhere in the prose
        code = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if code not in prose and code not in codes:
            codes.append(code)
    # the asked fact takes the evenly spaced slot nearest to `depth` and moves to `depth` itself
    slots = [(i + 0.5) / needles for i in range(needles)]
    asked = min(range(needles), key=lambda i: abs(slots[i] - depth))
    slots[asked] = float(depth)
    answers = [enc(" " + code) for code in codes]
    facts = [enc(PROSE_FACT.format(name=name)) + answer + enc(".\n") for name, answer in zip(names, answers)]
    question = enc(PROSE_QUESTION.format(name=names[asked]))
    body = length - len(question) - sum(map(len, facts))
    if body < needles:
        raise ValueError(f"length {length} is too short for {needles} needles and the question")
    text = enc(prose)
    if len(text) < body:
        raise ValueError(f"not enough documentation text for {length} tokens")
    text = text[:body]
    # a needle goes at a line boundary (after a token that ends a line), the one nearest its depth
    ends_line = {}
    boundaries = [0] + [i + 1 for i, t in enumerate(text)
                        if ends_line.setdefault(t, tokenizer.decode([t]).endswith("\n"))] + [body]
    cuts = [min(boundaries, key=lambda b: (abs(b - slot * body), b)) for slot in slots]
    ids, spans, at = [], [None] * needles, 0
    for i in sorted(range(needles), key=lambda i: (cuts[i], slots[i])):
        ids += text[at:cuts[i]]
        spans[i] = (len(ids), len(ids) + len(facts[i]))
        ids += facts[i]
        at = cuts[i]
    ids += text[at:] + question
    return Sample(torch.tensor([ids]), torch.tensor([answers[asked]]), length, float(depth), seed,
                  task="retrieval_prose", needles=tuple(spans), asked=asked)


@torch.no_grad()
def answer_found(model, sample: Sample) -> tuple[bool, float]:
    """(every answer token is the greedy argmax, prefill seconds of the prompt+answer forward)."""
    ids = torch.cat([sample.prompt, sample.answer], dim=1)
    n = sample.answer.shape[1]
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits
    seconds = time.perf_counter() - start
    predicted = logits[0, :-1].argmax(-1)
    return bool(torch.equal(predicted, sample.answer[0])), seconds


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, *, chunk: int | None = None, tail: int | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood (float64) of `ids [1, L]` under the model: `[L - 1]`, or the
    last `tail` predictions only (each still conditioned on the whole prefix).

    The LM head runs over `chunk` positions at a time (default: about 16M logits per chunk; a 32k
    prompt's full logits over Gemma's 262k vocabulary would be 34 GB in float32) when the model
    exposes its decoder and output head; `final_logit_softcapping` is applied per chunk."""
    return timed_token_nll(model, ids, chunk=chunk, tail=tail)[0]


@torch.no_grad()
def timed_token_nll(model, ids: torch.Tensor, *, chunk: int | None = None,
                    tail: int | None = None) -> tuple[torch.Tensor, float]:
    """`token_nll` and the seconds of its decoder forward (the prefill; the LM head is not included)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
        raise ValueError(f"tail must be a positive int or None, got {tail!r}")
    n = ids.shape[1] - 1 if tail is None else min(tail, ids.shape[1] - 1)
    targets = ids[0, -n:]
    decoder, head = getattr(model, "get_decoder", None), model.get_output_embeddings()
    if decoder is None or head is None:
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1].double()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none"), time.perf_counter() - start
    start = time.perf_counter()
    hidden = decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, -n - 1:-1]
    seconds = time.perf_counter() - start
    chunk = chunk or max(1, 2 ** 24 // head.weight.shape[0])
    cap = getattr(model.config, "final_logit_softcapping", None)
    parts = []
    for at in range(0, n, chunk):
        logits = head(hidden[at:at + chunk]).double()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        parts.append(torch.nn.functional.cross_entropy(logits, targets[at:at + chunk], reduction="none"))
    return torch.cat(parts), seconds


def document_ids(tokenizer, length: int, *, seed: int = 0) -> torch.Tensor:
    """`[1, length]` token ids of real documentation text (the perplexity task's document)."""
    ids = tokenizer(document_text(length * 8, seed=seed), return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] < length:
        raise ValueError(f"not enough documentation text for {length} tokens")
    return ids


def nll_comparison(dense: torch.Tensor, method: torch.Tensor, *, skip: int = 0) -> dict:
    """Perplexities and the per-token NLL difference (method - dense) over positions after `skip`."""
    diff = (method - dense)[skip:]
    return {"length": int(dense.numel()) + 1, "ppl_dense": math.exp(float(dense[skip:].mean())),
            "ppl_method": math.exp(float(method[skip:].mean())), "nll_delta_mean": float(diff.mean()),
            "nll_delta_max": float(diff.abs().max())}


def perplexity_delta(model, tokenizer, method: str, *, length: int = 2048, seed: int = 0, skip: int = 0,
                     **params) -> dict:
    """Dense vs `method` on `length` tokens of real documentation: perplexities, mean and max per-token NLL
    difference (method - dense) over positions after `skip`."""
    from blockattn import hf
    _check_length(tokenizer, length, model)
    ids = document_ids(tokenizer, length, seed=seed)
    dense = token_nll(model, ids)
    with hf.patch(model, method, **params):
        sparse = token_nll(model, ids)
    return {"method": method, **nll_comparison(dense, sparse, skip=skip)}


def sentences(n: int, *, seed: int = 0) -> list[str]:
    """`n` real English sentences (20-400 characters) from Python's documentation."""
    import re
    text = document_text(200_000, seed=seed)
    found = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if 20 <= len(s) <= 400 and s[0].isalpha()]
    random.Random(seed).shuffle(found)
    if len(found) < n:
        raise ValueError(f"only {len(found)} sentences available, asked for {n}")
    return found[:n]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of all-MiniLM)."""
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def encoder_fidelity(model, tokenizer, method: str, *, n_sentences: int = 64, seed: int = 0, **params) -> dict:
    """Cosine similarity between dense and `method` embeddings of real sentences (mean and min)."""
    from blockattn import hf
    texts = sentences(n_sentences, seed=seed)
    dense = embed(model, tokenizer, texts)
    with hf.patch(model, method, **params):
        sparse = embed(model, tokenizer, texts)
    cos = (dense.double() * sparse.double()).sum(-1)
    return {"method": method, "n": n_sentences, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}

"""Retrieval heads: Wu, Wang, Xiao, Peng, Fu, "Retrieval Head Mechanistically Explains Long-Context
Factuality" (arXiv 2404.15574; official code nightdessert/Retrieval_Head, retrieval_head_detection.py).

The retrieval score of a query head measures how often it copies the needle while the model retrieves it.
A needle sentence is hidden at a depth of a haystack (at a sentence break), the question follows, and the
model prefills the prompt without its last token, then decodes greedily from that token (up to 50 new
tokens, until a newline). At decode step t the model emits w_t; a head whose top-1 attention position j*
of that step's query row lies inside the needle span [s, e) with prompt[j*] = w_t (a copy-paste event)
adds 1 / (e - s). The span is the first window of |answer| prompt tokens whose token set covers more than
90% of the answer's. A sample counts only if the response's ROUGE-1 recall of the answer exceeds 0.5;
a head's score is its mean over counted samples. Heads scoring above 0.1 are retrieval heads.

Masking a head (the paper's causal test) makes its attention uniform over the cache during decoding only
(the official code zeroes its query); `masking_check` runs that and zero-ablation of the heads' outputs.

Choices of ours: the haystack is Python's documentation text (the paper's Paul Graham essays are not
shipped), the needles are three sentences of ours in the paper's needle/question/answer form, ROUGE
tokenises as rouge_score does but without its Porter stemmer, and the newline stop waits for the first
non-blank answer token (a base model often starts its answer on a new line).
"""
from __future__ import annotations

import collections
import dataclasses
import random
import re

import torch
from torch import Tensor

from blockattn.analysis.hooks import hooks

THRESHOLD = 0.1  # the paper's retrieval-head cut-off


@dataclasses.dataclass(frozen=True)
class Needle:
    """A needle sentence, the question that asks for it, and the span the model must copy (`real_needle`)."""
    needle: str
    question: str
    answer: str


NEEDLES = (
    Needle("The best thing to do in Lisbon is to ride the yellow tram up the hill and eat a custard tart at sunset.",
           "What is the best thing to do in Lisbon?",
           "ride the yellow tram up the hill and eat a custard tart at sunset"),
    Needle("The secret code of the northern lighthouse keeper is 48613, written on a brass plate.",
           "What is the secret code of the northern lighthouse keeper?",
           "48613"),
    Needle("Ada painted her boat bright orange because she wanted the seals to recognise her from far away.",
           "Why did Ada paint her boat bright orange?",
           "because she wanted the seals to recognise her from far away"),
)
QUESTION = "\nBased on the content of the book, Question: {question}\nAnswer:"


@dataclasses.dataclass
class RetrievalResult:
    """Scores `[layers, query heads]` (mean over counted samples) and what each sample did."""
    scores: Tensor
    samples: list[dict]

    @property
    def counted(self) -> int:
        return sum(s["counted"] for s in self.samples)

    def top(self, k: int = 20) -> list[tuple[int, int, float]]:
        """The `k` best heads as (layer, head, score), best first."""
        flat = self.scores.flatten()
        order = flat.argsort(descending=True, stable=True)[:k]
        heads = self.scores.shape[1]
        return [(int(i) // heads, int(i) % heads, float(flat[i])) for i in order]

    def retrieval_heads(self, threshold: float = THRESHOLD) -> list[tuple[int, int]]:
        return [(layer, head) for layer, head, score in self.top(self.scores.numel()) if score > threshold]

    def kv_head_scores(self, kv_heads: int) -> Tensor:
        """`[layers, kv_heads]`: per KV head, its best query head's score (query head h reads KV head
        h // (heads / kv_heads), transformers' grouping), for policies that keep or drop KV heads."""
        layers, heads = self.scores.shape
        if isinstance(kv_heads, bool) or not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"kv_heads must be a positive divisor of the {heads} query heads, got {kv_heads!r}")
        return self.scores.view(layers, kv_heads, heads // kv_heads).amax(-1)


def retrieval_scores(model, tokenizer, **options) -> Tensor:
    """`[layers, query heads]` retrieval scores; options as `retrieval_search`."""
    return retrieval_search(model, tokenizer, **options).scores


@torch.no_grad()
def retrieval_search(model, tokenizer, *, lengths=(1000, 2000), depths=10, needles=NEEDLES, haystack: str | None = None,
                     max_new_tokens: int = 50, min_recall: float = 0.5, buffer: int = 200,
                     progress=None) -> RetrievalResult:
    """Run the detection grid: every context length x depth x needle is one sample.

    Args:
        lengths: prompt lengths in tokens (the haystack and needle fill `length - buffer`, as the paper).
        depths: a number of depths spread over 0-100% (the paper's 10), or a sequence of percents.
        needles: `Needle`s (the paper ships three; these are ours in its form).
        haystack: filler text (default: Python's documentation, `blockattn.bench.tasks.document_text`).
        max_new_tokens: decode limit (the paper's 50); min_recall: ROUGE-1 recall a response needs to count.
        progress: optional `callable(dict)` called with each finished sample.
    """
    lengths = _int_list("lengths", lengths, minimum=buffer + 16)
    depths = _depths(depths)
    if not isinstance(needles, (list, tuple)) or not needles or not all(isinstance(n, Needle) for n in needles):
        raise TypeError("needles must be a non-empty sequence of blockattn.analysis.retrieval.Needle")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not 0.0 <= float(min_recall) <= 1.0:
        raise ValueError(f"min_recall must be in [0, 1], got {min_recall!r}")
    if haystack is None:
        from blockattn.bench.tasks import document_text
        haystack = document_text(max(lengths) * 8, seed=0)
    if not isinstance(haystack, str):
        raise TypeError(f"haystack must be a str, got {type(haystack).__name__}")
    haystack_ids = _encode(tokenizer, haystack)
    with _patched(model):
        layers, heads = _shape(model)
        total = torch.zeros(layers, heads, dtype=torch.float64)
        samples = []
        for length in lengths:
            for depth in depths:
                for index, needle in enumerate(needles):
                    prompt, span = needle_prompt(tokenizer, needle, length, depth, haystack_ids, buffer=buffer)
                    score, response = _score_sample(model, tokenizer, prompt, span, max_new_tokens, layers, heads)
                    recall = rouge1_recall(needle.answer, response)
                    counted = recall > min_recall
                    if counted:
                        total += score
                    sample = dict(length=length, depth=depth, needle=index, span=span, response=response,
                                  recall=recall, counted=counted, best=float(score.max()))
                    samples.append(sample)
                    if progress is not None:
                        progress(sample)
    kept = sum(s["counted"] for s in samples)
    scores = (total / kept if kept else total).float()
    return RetrievalResult(scores, samples)


def needle_prompt(tokenizer, needle: Needle, length: int, depth: float, haystack_ids: list[int], *,
                  buffer: int = 200) -> tuple[Tensor, tuple[int, int]]:
    """(prompt ids `[1, L]`, needle span (s, e)): the paper's `insert_needle` + question, on token ids."""
    needle_ids = _encode(tokenizer, " " + needle.needle)
    room = length - buffer
    if room <= len(needle_ids):
        raise ValueError(f"length {length} leaves no room for the needle after the {buffer}-token buffer")
    if len(haystack_ids) + len(needle_ids) < room:
        raise ValueError(f"the haystack has {len(haystack_ids)} tokens, fewer than the {room} a {length}-token "
                         "prompt needs")
    context = haystack_ids[:room - len(needle_ids)]
    if depth >= 100:
        ids = context + needle_ids
    else:
        periods = set(_encode(tokenizer, "."))
        cut = int(len(context) * depth / 100)
        while cut > 0 and context[cut - 1] not in periods:  # back to a sentence break, as the paper
            cut -= 1
        ids = context[:cut] + needle_ids + context[cut:]
    ids = ids + _encode(tokenizer, QUESTION.format(question=needle.question))
    prompt = torch.tensor([ids])
    span = find_needle_span(prompt[0], _encode(tokenizer, needle.answer))
    if span is None:
        raise ValueError(f"could not find the answer of needle {needle.needle!r} in its prompt")
    return prompt, span


def find_needle_span(prompt_ids: Tensor, answer_ids: list[int]) -> tuple[int, int] | None:
    """The first window of `len(answer_ids)` tokens whose token set covers > 90% of the answer's set
    (the official `find_needle_idx`)."""
    wanted = set(answer_ids)
    ids = prompt_ids.tolist()
    for start in range(len(ids)):
        window = set(ids[start:start + len(answer_ids)])
        if len(window & wanted) / len(wanted) > 0.9:
            return start, start + len(answer_ids)
    return None


def _score_sample(model, tokenizer, prompt: Tensor, span, max_new_tokens, layers, heads):
    """Prefill all but the last prompt token, decode greedily from it; per-head copy-paste score."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    start, end = span
    prompt_tokens = prompt[0]
    cache = model(prompt[:, :-1], use_cache=True).past_key_values
    score = torch.zeros(layers, heads, dtype=torch.float64)
    token, emitted = prompt[:, -1:], []
    with hooks(model) as h:
        h.record_rows(range(prompt.shape[1] - 1, prompt.shape[1] - 1 + max_new_tokens), top_k=1)
        for _ in range(max_new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            emitted_id = int(token)
            top = torch.stack([h.rows[layer][-1].indices[0, :, 0, 0] for layer in range(layers)]).cpu()  # [L, Hq]
            h.clear()
            score += copy_paste_hits(top, emitted_id, prompt_tokens.cpu(), span).double() / (end - start)
            emitted.append(emitted_id)
            text = tokenizer.decode(emitted)
            if emitted_id == tokenizer.eos_token_id or ("\n" in tokenizer.decode([emitted_id]) and text.strip()):
                break
    return score, tokenizer.decode(emitted, skip_special_tokens=True).strip()


def copy_paste_hits(top: Tensor, emitted: int, prompt_ids: Tensor, span: tuple[int, int]) -> Tensor:
    """`[layers, heads]` bool: the head's top-1 attended position `top` lies in the needle span and holds
    the token just emitted (the official `retrieval_calculate` with topk=1)."""
    start, end = span
    inside = (top >= start) & (top < end)
    return inside & (prompt_ids[top.clamp(0, prompt_ids.numel() - 1)] == emitted)


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of `reference` in `response` (rouge_score's tokenizer: lower case, alphanumeric runs)."""
    ref, got = _rouge_tokens(reference), _rouge_tokens(response)
    if not ref:
        return 0.0
    overlap = collections.Counter(ref) & collections.Counter(got)
    return sum(overlap.values()) / len(ref)


def _rouge_tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


# --------------------------------------------------------------------------------- causal test
@torch.no_grad()
def masking_check(model, tokenizer, scores: Tensor, *, lengths=(1000, 2000), depths=(10, 30, 50, 70, 90),
                  fraction: float = 0.05, draws: int = 3, modes=("uniform", "zero"), seed: int = 0,
                  progress=None) -> dict:
    """The paper's causal test: answer accuracy with the top `fraction` of heads by score masked vs as many
    random heads scoring <= 0.1 (`draws` draws), masked while the answer is decoded (one clean prefill per
    sample, shared by every condition).

    Tasks (`blockattn.bench.tasks`): passkey retrieval at each depth, and multi-needle retrieval (four
    facts in real text, one asked; one sample per depth, seeded by it). A sample is correct when every
    answer token is the greedy choice (teacher-forced, so one forward per condition). Returns
    {"top": heads, "random": [heads per draw], "rows": [{"task", "mode", "condition", "correct", "total"}]}.
    """
    from blockattn.bench import tasks

    if not isinstance(scores, Tensor) or scores.dim() != 2:
        raise TypeError("scores must be a [layers, heads] tensor (retrieval_scores' result)")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    for mode in modes:
        if mode not in ("uniform", "zero"):
            raise ValueError(f"modes must be 'uniform' and/or 'zero', got {mode!r}")
    layers, heads = scores.shape
    k = max(1, round(fraction * layers * heads))
    flat = scores.flatten()
    order = flat.argsort(descending=True, stable=True).tolist()
    top = [divmod(i, heads) for i in order[:k]]
    others = [divmod(i, heads) for i in order[k:] if float(flat[i]) <= THRESHOLD]
    if len(others) < k:
        raise ValueError(f"only {len(others)} heads score <= {THRESHOLD}; cannot draw {k} random non-retrieval heads")
    rng = random.Random(seed)
    conditions = [("none", [])] + [("top", top)] + [(f"random {d + 1}", sorted(rng.sample(others, k)))
                                                   for d in range(draws)]
    counts = collections.defaultdict(lambda: [0, 0])
    device = next(model.parameters()).device
    with _patched(model):
        for length in lengths:
            for depth in depths:
                for sample in (tasks.passkey(tokenizer, length, depth / 100, seed=int(depth), model=model),
                               tasks.multi_needle(tokenizer, length, seed=int(depth), model=model)):
                    prompt, answer = sample.prompt.to(device), sample.answer.to(device)
                    cache = model(prompt[:, :-1], use_cache=True).past_key_values
                    forced = torch.cat([prompt[:, -1:], answer[:, :-1]], dim=1)
                    for mode in modes:
                        for name, chosen in conditions:
                            if name == "none" and mode != modes[0]:
                                continue
                            with hooks(model) as h:
                                if chosen:
                                    h.ablate({head: mode for head in chosen})
                                logits = model(forced, past_key_values=cache, use_cache=True).logits
                            cache.crop(-forced.shape[1])  # back to the clean prefill (negative: tokens removed)
                            row = counts[(sample.task, "-" if name == "none" else mode, name)]
                            row[0] += int(torch.equal(logits[0].argmax(-1), answer[0]))
                            row[1] += 1
                    if progress is not None:
                        progress(dict(length=length, depth=depth, task=sample.task))
    rows = [dict(task=t, mode=m, condition=c, correct=v[0], total=v[1]) for (t, m, c), v in counts.items()]
    return dict(top=top, random=[c[1] for c in conditions[2:]], rows=rows)


# ----------------------------------------------------------------------------------- the picture
def plot_scores(scores: Tensor, path: str, *, title: str | None = None) -> str:
    """PNG heatmap of `[layers, heads]` retrieval scores (layer rows, head columns)."""
    from blockattn.plots import figure, save

    layers, heads = scores.shape
    fig, axes = figure(1, 1, figsize=(max(3.5, 0.45 * heads + 2.0), max(3.5, 0.22 * layers + 1.5)))
    ax = axes[0, 0]
    image = ax.imshow(scores.float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=max(float(scores.max()), 1e-6),
                      aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="retrieval score")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    found = int((scores > THRESHOLD).sum())
    ax.set_title(title or f"retrieval heads: {found}/{scores.numel()} score > {THRESHOLD}", fontsize=9)
    return save(fig, path)


# ------------------------------------------------------------------------------------- plumbing
class _patched:
    """Patch the model with dense blockattn attention for the duration, unless it is patched already."""

    def __init__(self, model):
        self.model, self.handle = model, None

    def __enter__(self):
        if getattr(self.model, "_blockattn_previous", None) is None:
            from blockattn import hf
            self.handle = hf.patch(self.model, "dense")
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.unpatch()
        return False


def _shape(model) -> tuple[int, int]:
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(config.num_hidden_layers), int(config.num_attention_heads)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _int_list(name, values, *, minimum) -> list[int]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be ints >= {minimum}, got {values}")
    return values


def _depths(depths) -> list[float]:
    if isinstance(depths, int) and not isinstance(depths, bool):
        if depths < 1:
            raise ValueError(f"depths must be a positive count or a sequence of percents, got {depths}")
        return [round(100 * i / (depths - 1)) if depths > 1 else 50 for i in range(depths)]
    values = list(depths)
    if not values or any(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 100 for d in values):
        raise ValueError(f"depths must be percents in [0, 100], got {values}")
    return values

"""SoftPAG and HeadHunter for a causal language model: perturbation-guided greedy decoding.

Ahn, Kang, Lee, Kim, Min, Jang, Lee, Paul, Hong, Kim, "Fine-Grained Perturbation Guidance via Attention
Head Selection" (arXiv 2506.10978), carried from diffusion to next-token prediction (the paper guides DiTs;
the text reading is this file's):
- the weak model is the same model with the chosen heads' attention moved toward identity,
  A <- (1 - u) A + u I (`analysis.hooks(model).perturb`), u in [0, 1];
- guided next-token logits are l + w (l - l~), l~ the weak model's (PAG's eps + w (eps - eps~)); greedy
  decoding takes the argmax of the guided logits at every step;
- HeadHunter (`softpag.head_hunter`) picks the heads greedily against an objective measured offline: here the
  mean guided log-probability of the indirect object on IOI prompts ("When Mary and John went to the store,
  John gave a drink to" -> " Mary"), with the IO-vs-S logit difference and top-1 accuracy beside it.

The two branches are two forward calls of the patched model (the hooks edit every row of a batch, so the
weak branch cannot share a batch with the plain one); nothing is cached between steps: the prefix is
recomputed, which is cheap at these lengths and keeps the two branches independent.
`experiment` is the CPU demonstration on SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from blockattn._checks import int_arg, number_arg

__all__ = ["guided_logits", "guided_generate", "ioi_scores", "experiment", "table"]


def _heads_arg(heads) -> list[tuple[int, int]]:
    try:
        chosen = [tuple(h) for h in heads]
    except TypeError:
        raise TypeError(f"heads must be a sequence of (layer, head) pairs, got {type(heads).__name__}") from None
    if any(len(h) != 2 for h in chosen):
        raise ValueError(f"heads must be (layer, head) pairs, got {list(heads)[:5]}")
    return chosen


def _ids_arg(ids) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"ids must be a LongTensor [B, L], got {type(ids).__name__}")
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor [B, L] with L >= 1, got {ids.dtype} {list(ids.shape)}")
    return ids


def _patched(model):
    from blockattn.analysis.retrieval import _patched as patched
    return patched(model)


@torch.no_grad()
def _next_logits(model, ids: Tensor, perturb: dict | None) -> Tensor:
    """`[B, V]` float32 next-token logits, with `perturb` {(layer, head): u} applied when given."""
    from blockattn import analysis

    with _patched(model), analysis.hooks(model) as h:
        if perturb:
            h.perturb(perturb)
        return model(ids, logits_to_keep=1).logits[:, -1].float()


def guided_logits(model, ids, heads, *, strength: float = 1.0, guidance: float = 1.0) -> Tensor:
    """`[B, V]` guided next-token logits l + w (l - l~) after the unpadded prompts `ids [B, L]`; l~ from
    the model with `heads` [(layer, head), ...] perturbed at strength u. With w = 0, u = 0 or no heads the
    weak branch is not run and the plain logits come back exactly."""
    ids, heads = _ids_arg(ids), _heads_arg(heads)
    strength = number_arg("strength", strength, low=0.0, high=1.0)
    guidance = number_arg("guidance", guidance)
    plain = _next_logits(model, ids, None)
    if guidance == 0 or strength == 0 or not heads:
        return plain
    weak = _next_logits(model, ids, {h: strength for h in heads})
    return plain + guidance * (plain - weak)


@torch.no_grad()
def guided_generate(model, ids, heads, *, strength: float = 1.0, guidance: float = 1.0, max_new_tokens: int = 8,
                    eos_token_id: int | None = None) -> Tensor:
    """Greedy decoding on the guided logits: `[B, L + n]`, the prompts `ids [B, L]` and up to
    `max_new_tokens` tokens (rows that emitted `eos_token_id` repeat it)."""
    ids = _ids_arg(ids)
    max_new_tokens = int_arg("max_new_tokens", max_new_tokens)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        token = guided_logits(model, ids, heads, strength=strength, guidance=guidance).argmax(-1)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


# ------------------------------------------------------------------------------------------- IOI task
def _groups(tokenizer, prompts, device):
    """Prompts grouped by token length (no padding needed): [(indices, ids [b, L])]."""
    encoded = [tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_length.setdefault(len(e), []).append(i)
    return [(members, torch.tensor([encoded[i] for i in members], device=device))
            for _, members in sorted(by_length.items())]


def _task(model, tokenizer, prompts):
    from blockattn.analysis.circuits import word_id

    device = next(model.parameters()).device
    io = torch.tensor([word_id(tokenizer, p.answer) for p in prompts], device=device)
    s = torch.tensor([word_id(tokenizer, p.foil) for p in prompts], device=device)
    return dict(groups=_groups(tokenizer, prompts, device), io=io, s=s, count=len(prompts))


def _all_logits(model, task, perturb) -> Tensor:
    rows = [None] * task["count"]
    for members, ids in task["groups"]:
        logits = _next_logits(model, ids, perturb)
        for j, i in enumerate(members):
            rows[i] = logits[j]
    return torch.stack(rows)


def _measure(logits: Tensor, task) -> dict:
    index = torch.arange(logits.shape[0], device=logits.device)
    logp = logits.log_softmax(-1)
    return dict(logp_io=float(logp[index, task["io"]].mean()),
                logit_diff=float((logits[index, task["io"]] - logits[index, task["s"]]).mean()),
                accuracy=float((logits.argmax(-1) == task["io"]).float().mean()))


def ioi_scores(model, tokenizer, prompts, heads=(), *, strength: float = 1.0, guidance: float = 1.0,
               plain: Tensor | None = None) -> dict:
    """Guided next-token quality on IOI `prompts` (`circuits.ioi_prompts`): mean log p(IO), mean IO - S logit
    difference and top-1 accuracy (the first step of guided greedy decoding names the IO). `plain`: the
    prompts' plain `[N, V]` logits, if already computed."""
    task = _task(model, tokenizer, prompts)
    if plain is None:
        plain = _all_logits(model, task, None)
    heads = _heads_arg(heads)
    strength = number_arg("strength", strength, low=0.0, high=1.0)
    if guidance == 0 or strength == 0 or not heads:
        return _measure(plain, task)
    weak = _all_logits(model, task, {h: strength for h in heads})
    return _measure(plain + guidance * (plain - weak), task)


# --------------------------------------------------------------------------------------------- experiment
def experiment(*, steps=None, batch=None, model: str = "smollm2-135m", guidance: float = 1.0,
               strengths=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), rounds: int = 3, candidates: int = 30,
               selection: int = 16, held_out: int = 32, random_sets: int = 3, seed: int = 0, tiny: bool = False,
               out: str = ".",
               progress_factory=None) -> dict:
    """HeadHunter on `selection` IOI prompts over `candidates` heads (one per layer, head index layer mod H,
    when `candidates` equals the layer count; else a seeded sample), then the SoftPAG strength sweep on
    `held_out` prompts of other seeds for the selected heads and for `random_sets` sets of as many random heads
    (seeded, drawn from all heads). Writes
    `softpag_text_sweep.png` under `out`."""
    import os
    import random

    from blockattn import models
    from blockattn.analysis.circuits import ioi_prompts
    from blockattn.analysis.softpag import head_hunter

    if steps is not None or batch is not None:
        raise ValueError("--steps / --batch do not apply to softpag_text (nothing is trained)")
    if tiny:
        rounds, candidates, selection, held_out, random_sets, strengths = 1, 3, 4, 4, 1, (0.0, 1.0)
    start, cpu_start = time.perf_counter(), time.process_time()
    lm, tokenizer = models.load(model)
    config = lm.config.get_text_config()
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    every = [(layer, head) for layer in range(layers) for head in range(heads)]
    if candidates == layers:
        pool = [(layer, layer % heads) for layer in range(layers)]
    else:
        pool = sorted(random.Random(f"softpag-text-pool-{seed}").sample(every, candidates))

    def mixed(n, s):  # ABBA and BABA alternating, as circuits.task_prompts
        abba, baba = ioi_prompts(n, "ABBA", seed=s), ioi_prompts(n, "BABA", seed=s)
        return [p for pair in zip(abba, baba) for p in pair][:n]
    select_prompts, test_prompts = mixed(selection, seed), mixed(held_out, seed + 100)
    select_task, test_task = _task(lm, tokenizer, select_prompts), _task(lm, tokenizer, test_prompts)
    select_plain, test_plain = _all_logits(lm, select_task, None), _all_logits(lm, test_task, None)
    load_seconds = time.perf_counter() - start

    evaluations = [0]

    def objective(head_set):
        evaluations[0] += 1
        weak = _all_logits(lm, select_task, {h: 1.0 for h in head_set})
        return _measure(select_plain + guidance * (select_plain - weak), select_task)["logp_io"]

    start = time.perf_counter()
    hunt = head_hunter(pool, objective, rounds=rounds)
    hunt_seconds = time.perf_counter() - start
    rng = random.Random(f"softpag-text-random-{seed}")
    others = [h for h in every if h not in hunt["selected"]]
    head_sets = {"HeadHunter": hunt["selected"]}
    for i in range(random_sets):
        head_sets[f"random {i + 1}"] = sorted(rng.sample(others, rounds))
    start = time.perf_counter()
    sweep = {}
    for name, head_set in head_sets.items():
        sweep[name] = []
        for u in strengths:
            weak = test_plain if u == 0 else _all_logits(lm, test_task, {h: float(u) for h in head_set})
            logits = test_plain + guidance * (test_plain - weak)
            sweep[name].append(dict(strength=float(u), weak=_measure(weak, test_task), **_measure(logits, test_task)))
    sweep_seconds = time.perf_counter() - start
    samples = []
    # the held-out prompts the unguided model gets wrong come first: where guidance can change the text
    wrong = (test_plain.argmax(-1) != test_task["io"]).tolist()
    for i in sorted(range(len(test_prompts)), key=lambda i: not wrong[i])[:3]:
        p = test_prompts[i]
        ids = torch.tensor([tokenizer(p.text, add_special_tokens=False).input_ids])
        for u in (0.0, 1.0):
            new = guided_generate(lm, ids, hunt["selected"], strength=u, guidance=guidance, max_new_tokens=6)
            samples.append(dict(prompt=p.text, strength=u, text=tokenizer.decode(new[0, ids.shape[1]:])))
    result = dict(model=model, seed=seed, guidance=guidance, layers=layers, heads=heads, selection=selection,
                  held_out=held_out, candidates=[list(h) for h in pool], evaluations=evaluations[0],
                  load_seconds=load_seconds, cpu_seconds=time.process_time() - cpu_start, hunt_seconds=hunt_seconds,
                  sweep_seconds=sweep_seconds,
                  hunt=dict(selected=[list(h) for h in hunt["selected"]],
                            history=[dict(added=[list(h) for h in r["added"]], score=r["score"],
                                          scores={f"{h[0]}.{h[1]}": s for h, s in r["scores"].items()})
                                     for r in hunt["history"]]),
                  base=dict(selection=_measure(select_plain, select_task), held_out=_measure(test_plain, test_task)),
                  head_sets={k: [list(h) for h in v] for k, v in head_sets.items()}, sweep=sweep, samples=samples)
    os.makedirs(out, exist_ok=True)
    result["plots"] = [_plot(result, os.path.join(out, "softpag_text_sweep.png"))]
    return result


def _plot(result: dict, path: str) -> str:
    from blockattn.plots import figure, save

    fig, axes = figure(1, 3, figsize=(14, 3.8))
    for ax, key, label in zip(axes[0], ("logp_io", "logit_diff", "accuracy"),
                              ("guided mean log p(IO)", "guided mean logit(IO) - logit(S)", "guided top-1 accuracy")):
        for name, rows in result["sweep"].items():
            heads = ", ".join(f"{h[0]}.{h[1]}" for h in result["head_sets"][name])
            ax.plot([r["strength"] for r in rows], [r[key] for r in rows], marker="o", label=f"{name} ({heads})")
            if name in ("HeadHunter", "random 1"):  # the weak branch alone, for two of the sets
                ax.plot([r["strength"] for r in rows], [r["weak"][key] for r in rows], marker=".", linestyle=":",
                        label=f"{name}: weak branch alone")
        ax.set_xlabel(f"SoftPAG strength u (guidance w = {result['guidance']})")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(f"SoftPAG-guided next token on IOI, {result['model']}, {result['held_out']} held-out prompts")
    return save(fig, path)


def table(result: dict) -> str:
    """Markdown: the base scores, the HeadHunter rounds and the strength sweep per head set."""
    b = result["base"]
    lines = [f"{result['model']}: {result['layers']} layers x {result['heads']} heads; unguided: selection "
             f"log p(IO) {b['selection']['logp_io']:.3f}, logit diff {b['selection']['logit_diff']:.2f}, accuracy "
             f"{b['selection']['accuracy']:.3f}; held-out log p(IO) {b['held_out']['logp_io']:.3f}, logit diff "
             f"{b['held_out']['logit_diff']:.2f}, accuracy {b['held_out']['accuracy']:.3f}. guidance w = "
             f"{result['guidance']}; HeadHunter {result['evaluations']} objective runs in "
             f"{result['hunt_seconds']:.0f} s, sweep {result['sweep_seconds']:.0f} s, load + plain "
             f"{result['load_seconds']:.0f} s (wall); {result['cpu_seconds']:.0f} CPU s in all", "",
             "| round | head added (layer.head) | guided log p(IO) | best / median / worst candidate |",
             "|---|---|---|---|"]
    for i, r in enumerate(result["hunt"]["history"]):
        values = sorted(r["scores"].values())
        added = ", ".join(f"{h[0]}.{h[1]}" for h in r["added"])
        lines.append(f"| {i + 1} | {added} | {r['score']:.4f} | {values[-1]:.4f} / {values[len(values) // 2]:.4f} / "
                     f"{values[0]:.4f} |")
    lines += ["", "| heads perturbed | u | guided log p(IO) | guided logit diff | guided accuracy | weak log p(IO) | "
              "weak logit diff |", "|---|---|---|---|---|---|---|"]
    for name, rows in result["sweep"].items():
        heads = ", ".join(f"{h[0]}.{h[1]}" for h in result["head_sets"][name])
        for r in rows:
            lines.append(f"| {name} ({heads}) | {r['strength']:.1f} | {r['logp_io']:.4f} | {r['logit_diff']:.3f} | "
                         f"{r['accuracy']:.3f} | {r['weak']['logp_io']:.4f} | {r['weak']['logit_diff']:.3f} |")
    lines += ["", "| prompt | u | guided greedy continuation |", "|---|---|---|"]
    for s in result["samples"]:
        lines.append(f"| {s['prompt']} | {s['strength']:.1f} | {s['text']!r} |")
    return "\n".join(lines)

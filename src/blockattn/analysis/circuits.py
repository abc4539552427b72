"""SAE circuit identification (O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models", arXiv 2405.12522; official code charlieoneill11/sae-circuits).

The rule, as the official code has it (src/sae.py, train.py, node.py, main.py, configs/config.yaml,
data/ioi.py, data/data_utils.py):
- Data (data/ioi.py): 250 IOI prompts from 15 BABA templates and their 15 ABBA twins (template, names and
  nouns drawn at random; the final IO token is dropped), none filtered by whether the model solves them,
  then 250 matched counterfactuals, one per prompt: the same template and nouns with [A] -> a third name
  C, [B] -> S, then the first S -> IO, so "Then, IO and S went ... S gave a bone to" becomes "Then, C and
  IO went ... S gave a bone to". Positives are the first half of the dataset, negatives the second.
- Every prompt gives R [heads_total, d_model]: each head's *result* (its output before o_proj projected
  through its own slice of W_O), averaged over the prompt's positions (`position="mean"`, the setting of
  the saved data; TransformerLens also averages its BOS position, which this model's prompts do not have).
- One SAE shared by all heads: d_model -> 200 features, x - b -> unit-norm linear (with bias) -> ReLU ->
  unit-norm linear (no bias) -> + b, with b one tied bias initialised at zero. "Unit norm" is along each
  weight's input dimension (the code's `normalize(weight, dim=-1)`), kept by projecting the gradient off
  each row and renormalising before every forward.
- Loss = MSE + 0.02 * mean over (example, head) of the codes' L1 norm; Adam lr 1e-3; 500 full-batch epochs
  on 10 examples drawn at random from the shuffled dataset (positives and negatives mixed).
- code(example, head) = argmax feature, computed on every example. Node score of a head = |U+|, the number
  of codes it shows on positives and never on negatives (the code's softmax over heads keeps the order);
  edge score of a head pair = the number of code pairs seen on positives and never on negatives.

Tasks, generated offline: indirect object identification (above; `ioi_prompts` keeps the older 5-template
generator with independent ABC negatives) and colored objects (Ippolito & Callison-Burch style "On the
table, I see a red pen, a blue cup and a green book. What color is the cup? Answer:"; negatives ask about an
object that is not on the table), both in `circuit_prompts.py`. Circuit reuse (Merullo et al. 2024) lives in
`circuit_reuse.py`.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import torch
from torch import Tensor, nn

from blockattn.analysis.circuit_prompts import (  # noqa: F401 - the prompts are part of this module's API
    ABBA_TEMPLATES, BABA_TEMPLATES, COLOR_FORMATS, COLOR_TEMPLATE, COLORS, GIFTS, IOI_TEMPLATES, ITEM_FORMATS, NAMES,
    OBJECTS, OFFICIAL_NAMES, OFFICIAL_OBJECTS, OFFICIAL_PLACES, OFFICIAL_PROMPTS, PLACES, SURFACES, Prompt, _count,
    colored_objects_prompts, ioi_dataset, ioi_prompts, ioi_texts, task_prompts)

FEATURES, L1, LR, EPOCHS, EXAMPLES = 200, 0.02, 1e-3, 500, 10  # configs/config.yaml


def word_id(tokenizer, word: str) -> int:
    """The single token of " word" (the names, colors and objects here all are one token with the space)."""
    ids = tokenizer(" " + word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens with a leading space for this tokenizer; pick one-token words")
    return ids[0]


# --------------------------------------------------------------------------------- running the model
def _batches(tokenizer, prompts, batch_size):
    """Prompts grouped by token length (no padding, so the last position is the same for a whole batch)."""
    groups: dict[int, list[int]] = {}
    encoded = [tokenizer(p.text, add_special_tokens=False).input_ids for p in prompts]
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    for _, members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            yield chunk, torch.tensor([encoded[i] for i in chunk])


def _patched(model):
    from blockattn.analysis.retrieval import _patched as patched
    return patched(model)


def head_results(model, tokenizer, prompts, *, position: str = "mean", batch_size: int = 32) -> Tensor:
    """`[N, layers * heads, d_model]` float32: each head's result (its output before o_proj times its slice
    of W_O), averaged over the prompt's positions (`position="mean"`, the official data) or at the last
    position ("last"), the SAE's input. Head order is layer-major (index = layer * heads + head)."""
    from blockattn import analysis

    if position not in ("mean", "last"):
        raise ValueError(f"position must be 'mean' or 'last', got {position!r}")
    device = next(model.parameters()).device
    out = [None] * len(prompts)
    with torch.no_grad(), _patched(model), analysis.hooks(model) as h:
        weights = [m.o_proj.weight for m in sorted(h.modules, key=lambda m: m.layer_idx)]
        for chunk, ids in _batches(tokenizer, prompts, batch_size):
            h.clear()
            h.record_outputs(positions=None if position == "mean" else [ids.shape[1] - 1])
            model(ids.to(device), logits_to_keep=1)
            # the result is linear in the output: the mean over positions can be taken first
            per_layer = [project_heads(w, h.outputs[layer][0].float().mean(2)) for layer, w in enumerate(weights)]
            stacked = torch.cat(per_layer, dim=1)
            for j, i in enumerate(chunk):
                out[i] = stacked[j]
    return torch.stack(out)


def project_heads(o_proj_weight: Tensor, z: Tensor) -> Tensor:
    """Each head's result: `z [..., H, D]` (outputs before o_proj) -> `[..., H, d_model]` through the head's
    own slice of W_O (no bias)."""
    heads, dim = z.shape[-2], z.shape[-1]
    return torch.einsum("...hd,mhd->...hm", z, o_proj_weight.float().view(-1, heads, dim))


def last_logits(model, tokenizer, prompts, *, edits=None, batch_size: int = 32) -> Tensor:
    """`[N, vocab]` float32 next-token logits at the last position, with `edits(h, length)` applied to the
    hooks (e.g. `h.ablate(...)`) before each batch; None runs the model as is."""
    from blockattn import analysis

    device = next(model.parameters()).device
    rows = [None] * len(prompts)
    with torch.no_grad(), _patched(model), analysis.hooks(model) as h:
        for chunk, ids in _batches(tokenizer, prompts, batch_size):
            h.restore()
            if edits is not None:
                edits(h, ids.shape[1])
            logits = model(ids.to(device), logits_to_keep=1).logits[:, -1].float()
            for j, i in enumerate(chunk):
                rows[i] = logits[j]
    return torch.stack(rows)


def task_metrics(logits: Tensor, tokenizer, prompts) -> dict:
    """Logit difference answer - foil (IOI: IO - S; colored objects: right color - best other listed color),
    accuracy among the candidates (the answer beats every other candidate) and top-1 over the vocabulary."""
    diffs, right, top1 = [], 0, 0
    for row, p in zip(logits, prompts):
        answer = row[word_id(tokenizer, p.answer)]
        others = torch.stack([row[word_id(tokenizer, c)] for c in p.candidates if c != p.answer])
        diffs.append(float(answer - others.max()))
        right += int(bool((answer > others).all()))
        top1 += int(int(row.argmax()) == word_id(tokenizer, p.answer))
    n = len(prompts)
    return dict(logit_diff=sum(diffs) / n, accuracy=right / n, top1=top1 / n, n=n)


# ---------------------------------------------------------------------------------------- the SAE
class _UnitNormLinear(nn.Module):
    """Linear layer whose weight rows stay unit norm: the gradient's component along each row is removed
    in backward, and rows are renormalised before every forward (Adam's momentum still moves the norm)."""

    def __init__(self, n_in, n_out, *, bias, generator, device):
        super().__init__()
        weight = torch.randn(n_out, n_in, generator=generator, device=device)
        self.weight = nn.Parameter(nn.functional.normalize(weight, dim=-1))
        if bias:
            bound = n_in ** -0.5
            self.bias = nn.Parameter((torch.rand(n_out, generator=generator, device=device) * 2 - 1) * bound)
        else:
            self.register_parameter("bias", None)
        self.weight.register_hook(self._project)

    def _project(self, grad):
        unit = self.weight.detach() / self.weight.detach().norm(dim=-1, keepdim=True)
        return grad - (grad * unit).sum(-1, keepdim=True) * unit

    def renormalise(self):
        with torch.no_grad():
            self.weight.copy_(nn.functional.normalize(self.weight, dim=-1))

    def forward(self, x):
        self.renormalise()
        return nn.functional.linear(x, self.weight, self.bias)


class CircuitSAE(nn.Module):
    """The shared SAE: `forward(x [..., d_model]) -> (codes [..., features] >= 0, reconstruction)`."""

    def __init__(self, d_model: int, features: int = FEATURES, *, seed: int = 0, device=None):
        super().__init__()
        _count("d_model", d_model)
        _count("features", features)
        generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        self.bias = nn.Parameter(torch.zeros(d_model, device=device))  # tied; the official code's zero median
        self.encoder = _UnitNormLinear(d_model, features, bias=True, generator=generator, device=device)
        self.decoder = _UnitNormLinear(features, d_model, bias=False, generator=generator, device=device)

    def forward(self, x: Tensor):
        acts = torch.relu(self.encoder(x - self.bias))
        return acts, self.decoder(acts) + self.bias


def sae_loss(acts: Tensor, recon: Tensor, x: Tensor, l1: float = L1) -> Tensor:
    """MSE over every element + l1 * the mean over (example, head) rows of the codes' L1 norm."""
    return nn.functional.mse_loss(recon, x) + l1 * acts.abs().sum(-1).mean()


def train_sae(results: Tensor, *, features: int = FEATURES, l1: float = L1, lr: float = LR, epochs: int = EPOCHS,
              seed: int = 0) -> CircuitSAE:
    """Full-batch Adam on `results [n, heads, d_model]` (the training examples) for `epochs` steps."""
    _check_results(results)
    with torch.enable_grad():
        sae = CircuitSAE(results.shape[-1], features, seed=seed, device=results.device)
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        x = results.detach().float()
        for _ in range(epochs):
            opt.zero_grad()
            loss = sae_loss(*sae(x), x, l1)
            loss.backward()
            opt.step()
        sae.encoder.renormalise()  # Adam's last step moved the norms; leave the trained SAE on the constraint
        sae.decoder.renormalise()
    sae.final_loss = float(loss.detach())
    return sae


def sae_codes(sae: CircuitSAE, results: Tensor) -> Tensor:
    """`[N, heads]` long: the argmax feature of every (example, head)."""
    with torch.no_grad():
        return sae(results.float())[0].argmax(-1)


def node_scores(codes: Tensor, n_positive: int, *, normalise: bool = False) -> Tensor:
    """`[heads]` float: |codes on positives minus codes on negatives| per head (rows `:n_positive` are the
    positives); `normalise` divides by the number of distinct codes the head shows."""
    if not 0 < n_positive < codes.shape[0]:
        raise ValueError(f"n_positive must be in (0, {codes.shape[0]}), got {n_positive}")
    features = int(codes.max()) + 1
    seen_pos = torch.zeros(codes.shape[1], features, dtype=torch.bool, device=codes.device)
    seen_neg = torch.zeros_like(seen_pos)
    heads = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)
    seen_pos[heads[:n_positive], codes[:n_positive]] = True
    seen_neg[heads[n_positive:], codes[n_positive:]] = True
    unique = (seen_pos & ~seen_neg).sum(-1).float()
    if normalise:
        unique = unique / (seen_pos | seen_neg).sum(-1).float()
    return unique


def edge_scores(codes: Tensor, n_positive: int) -> Tensor:
    """`[heads, heads]` float: per head pair, the number of distinct code pairs on positives never seen on
    negatives (symmetric; the diagonal is the node score)."""
    if not 0 < n_positive < codes.shape[0]:
        raise ValueError(f"n_positive must be in (0, {codes.shape[0]}), got {n_positive}")
    features = int(codes.max()) + 1
    pairs = codes[:, :, None] * features + codes[:, None, :]  # [N, H, H]
    pos, neg = pairs[:n_positive], pairs[n_positive:]
    new = torch.ones_like(pos, dtype=torch.bool)
    for j in range(neg.shape[0]):  # O(N H^2) memory, not O(N^2 H^2)
        new &= pos != neg[j]
    first = torch.ones_like(new)
    for i in range(1, pos.shape[0]):
        first[i] = (pos[i][None] != pos[:i]).all(0)
    return (new & first).sum(0).float()


def _check_results(results):
    if not isinstance(results, Tensor):
        raise TypeError(f"results must be a tensor [N, heads, d_model], got {type(results).__name__}")
    if results.dim() != 3 or not results.is_floating_point():
        raise ValueError(f"results must be a floating tensor [N, heads, d_model], got {results.dtype} "
                         f"{list(results.shape)}")


class Ranking(NamedTuple):
    """scores: `[layers, heads]` mean node score over trials; order: (layer, head) pairs best first."""
    scores: Tensor
    order: list

    def top(self, k: int) -> list:
        return self.order[:k]


def rank_heads(results: Tensor, n_positive: int, *, heads: int, trials: int = 1, examples: int = EXAMPLES,
               features: int = FEATURES, epochs: int = EPOCHS, seed: int = 0, balanced: bool = False,
               normalise: bool = False) -> Ranking:
    """Rank heads by SAE node score: per trial, train the SAE on `examples` examples drawn at random from the
    whole dataset (the official `prepare_data`: the first `examples` of a random permutation, positives and
    negatives mixed; `balanced`: half from each instead), code every example and score |U+|; scores are
    averaged over `trials` (the official code reports one trial per run); `normalise`: |U+| / |all codes|
    (the config's `normalise`, False there). Ties keep layer-major order."""
    _check_results(results)
    n = results.shape[0]
    if not 0 < n_positive < n:
        raise ValueError(f"n_positive must be in (0, {n}), got {n_positive}")
    if results.shape[1] % heads:
        raise ValueError(f"results hold {results.shape[1]} heads, not a multiple of heads={heads}")
    _count("trials", trials)
    total = torch.zeros(results.shape[1], dtype=torch.float64, device=results.device)
    for t in range(trials):
        g = torch.Generator().manual_seed(seed * 1000 + t)
        if balanced:
            half = examples // 2
            pos = torch.randperm(n_positive, generator=g)[:examples - half]
            chosen = torch.cat([pos, n_positive + torch.randperm(n - n_positive, generator=g)[:half]])
        else:
            chosen = torch.randperm(n, generator=g)[:examples]
        train = results[chosen.to(results.device)]
        sae = train_sae(train, features=features, epochs=epochs, seed=seed * 1000 + t)
        total += node_scores(sae_codes(sae, results), n_positive, normalise=normalise).double()
    scores = (total / trials).float()
    flat = sorted(range(scores.numel()), key=lambda i: -float(scores[i]))
    return Ranking(scores.view(-1, heads), [divmod(i, heads) for i in flat])


def logit_attribution_ranking(model, tokenizer, results: Tensor, prompts, *, heads: int) -> Ranking:
    """A baseline ranking, not the paper's: |mean direct logit attribution| of each head's last-position
    result onto the answer - foil unembedding difference (through the final norm's gain; the per-prompt
    RMS scale is left out, it is one positive factor for every head of a prompt)."""
    _check_results(results)
    unembed = model.get_output_embeddings().weight
    gain = model.model.norm.weight
    answer = torch.tensor([word_id(tokenizer, p.answer) for p in prompts], device=unembed.device)
    foil = torch.tensor([word_id(tokenizer, p.foil) for p in prompts], device=unembed.device)
    with torch.no_grad():
        direction = (unembed[answer] - unembed[foil]).float() * gain.float()  # [N, d_model]
        dla = torch.einsum("nhm,nm->nh", results[:len(prompts)].float(), direction).mean(0).abs()
    flat = sorted(range(dla.numel()), key=lambda i: -float(dla[i]))
    return Ranking(dla.view(-1, heads), [divmod(i, heads) for i in flat])


# ------------------------------------------------------------------------------------ ablation check
def last_position_means(model, tokenizer, prompts, *, batch_size: int = 32, every_position: bool = False) -> Tensor:
    """`[layers, heads, D]`: each head's mean output (before o_proj) at the last position over `prompts`
    (`every_position`: over all their positions)."""
    from blockattn import analysis

    device = next(model.parameters()).device
    with torch.no_grad(), _patched(model), analysis.hooks(model) as h:
        for _, ids in _batches(tokenizer, prompts, batch_size):
            h.record_outputs(positions=None if every_position else [ids.shape[1] - 1])
            model(ids.to(device), logits_to_keep=1)
        return h.mean_outputs()


def last_position_edit(heads, replacement):
    """`edits(h, length)` for `last_logits`: replace the last position's output of each (layer, head) by
    `replacement(layer, head, out_last [B, D])`, leaving the other positions alone."""
    def edits(h, length):
        def make(layer, head):
            def f(out):
                out = out.clone()
                out[:, -1] = replacement(layer, head, out[:, -1]).to(out.dtype)
                return out
            return f
        h.ablate({(layer, head): make(layer, head) for layer, head in heads})
    return edits


def mean_ablation(heads, means: Tensor, *, every_position: bool = False):
    """Mean-ablate `heads` at the last position (`every_position`: at all positions, the hook API's `[D]`
    replacement) with `means [layers, heads, D]`."""
    if every_position:
        return lambda h, length: h.ablate({(layer, head): means[layer, head] for layer, head in heads})
    return last_position_edit(heads, lambda layer, head, out: means[layer, head].expand_as(out))


def ablation_check(model, tokenizer, ranking: Ranking, prompts, means: Tensor, *, ks, draws: int = 3,
                   seed: int = 0, every_position: bool = False) -> list[dict]:
    """Task metrics with no ablation, with the top-k ranked heads mean-ablated, and with k random heads
    (drawn from the heads outside the top k) mean-ablated, `draws` times, for each k in `ks`; `means` are
    last-position means, or with `every_position` all-position means applied at every position."""
    _count("draws", draws)
    def measure(condition, k, heads):
        edits = mean_ablation(heads, means, every_position=every_position) if heads else None
        logits = last_logits(model, tokenizer, prompts, edits=edits)
        return dict(condition=condition, k=k, heads=list(heads), **task_metrics(logits, tokenizer, prompts))

    rows = [measure("none", 0, [])]
    rng = random.Random(seed)
    for k in ks:
        rows.append(measure("top", k, ranking.top(k)))
        rest = ranking.order[k:]
        rows.extend(measure(f"random {d + 1}", k, rng.sample(rest, k)) for d in range(draws))
    return rows


# ----------------------------------------------------------------------------------------- pictures
def plot_scores(scores: Tensor, path: str, *, title: str, label: str = "node score |U+|") -> str:
    """PNG heatmap of `[layers, heads]` node scores (or any per-head score, named by `label`)."""
    from blockattn.plots import figure, save

    layers, heads = scores.shape
    fig, axes = figure(1, 1, figsize=(max(3.5, 0.45 * heads + 2.0), max(3.5, 0.22 * layers + 1.5)))
    ax = axes[0, 0]
    image = ax.imshow(scores.float().cpu().numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(title, fontsize=9)
    return save(fig, path)


def plot_ablation(rows_by_task: dict, path: str, *, metric: str = "logit_diff") -> str:
    """PNG bar chart: `metric` with no ablation, top-k and random-k ablations, one panel per task."""
    from blockattn.plots import figure, save

    fig, axes = figure(1, len(rows_by_task), figsize=(5.0 * len(rows_by_task), 3.6))
    for ax, (task, rows) in zip(axes[0], rows_by_task.items()):
        def label(r):
            if r["k"] == 0:
                return "none"
            tag = "DLA " if r.get("ranking", "").startswith("DLA") else ""
            return f"{tag}{r['condition']}\nk={r['k']}"

        def color(r):
            if r["k"] == 0:
                return "gray"
            if r["condition"] != "top":
                return "tab:blue"
            return "tab:green" if r.get("ranking", "").startswith("DLA") else "tab:red"
        labels, colors = [label(r) for r in rows], [color(r) for r in rows]
        ax.bar(range(len(rows)), [r[metric] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{task}: mean-ablation (red: SAE top-k, green: DLA top-k, blue: random k)", fontsize=8)
    return save(fig, path)


# ------------------------------------------------------------------------------------- whole task
def find_circuit(model, tokenizer, task: str, *, n: int = OFFICIAL_PROMPTS, held_out: int = 100, trials: int = 1,
                 seed: int = 0, position: str = "mean", filter_correct: bool = False, balanced: bool = False,
                 colored=None, normalise: bool = False, progress=None) -> dict:
    """The pipeline on one task, by default the official one: `n` generated prompts as positives (not
    filtered by correctness) and their `n` negatives (IOI: the matched counterfactuals), head results
    averaged over positions, the SAE ranking over `trials`. `filter_correct` (the earlier, not official,
    choice): positives are the first `n` of `3 n` generated prompts the model answers right. Also returned:
    `held_out` fresh task prompts (not filtered) for the ablation check, the negatives' head means (last
    position and every position; the reference for mean-ablation, an ABC-style mean as Wang et al.'s) and
    the direct-logit-attribution baseline (last-position results of the positives)."""
    _count("n", n)
    candidates, negatives = task_prompts(task, 3 * n if filter_correct else n, seed=seed, colored=colored)
    logits = last_logits(model, tokenizer, candidates)
    metrics = task_metrics(logits, tokenizer, candidates)
    right = [p for p, row in zip(candidates, logits) if _correct(row, tokenizer, p)]
    if filter_correct:
        if len(right) < 2:
            raise ValueError(f"the model solves only {len(right)} of {len(candidates)} {task} prompts: no positives")
        positives, negatives = right[:n], negatives[:min(n, len(right))]
    else:
        positives = candidates
    if progress:
        progress(f"{task}: {len(right)}/{len(candidates)} generated prompts right; {len(positives)} positives, "
                 f"{len(negatives)} negatives")
    results = head_results(model, tokenizer, positives + negatives, position=position)
    heads = results.shape[1] // len(model.model.layers)
    ranking = rank_heads(results, len(positives), heads=heads, trials=trials, seed=seed, balanced=balanced,
                         normalise=normalise)
    if progress:
        progress(f"{task}: SAE ranking done ({trials} trial(s), results at position {position!r})")
    last = results[:len(positives)] if position == "last" else head_results(model, tokenizer, positives,
                                                                              position="last")
    test, _ = task_prompts(task, held_out, seed=seed + 1, colored=colored)
    return dict(task=task, ranking=ranking, results=results, positives=positives, negatives=negatives,
                generated=metrics, solved=len(right), tried=len(candidates), held_out=test,
                baseline=logit_attribution_ranking(model, tokenizer, last, positives, heads=heads),
                means=last_position_means(model, tokenizer, negatives),
                means_all=last_position_means(model, tokenizer, negatives, every_position=True))


def _correct(row, tokenizer, p):
    answer = row[word_id(tokenizer, p.answer)]
    return all(bool(answer > row[word_id(tokenizer, c)]) for c in p.candidates if c != p.answer)

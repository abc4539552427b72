"""Circuit component reuse between IOI and Colored Objects (Merullo, Eickhoff, Pavlick, "Circuit Component
Reuse Across Tasks in Transformer Language Models", ICLR 2024, arXiv 2310.08744).

The paper finds each task's circuit with staged path patching, takes the union of the top 2% heads per
stage, reports ~78% overlap of in-circuit heads, and transfers IOI behaviour to Colored Objects by
adjusting four mid-layer (inhibition) heads (49.6% -> 93.7% accuracy on GPT-2 Medium).

Here the circuits are the SAE rankings of `circuits.py`, or the path-patching circuits of
`path_patching.staged_circuit` (the paper's method, two of its stages). The rule:
- circuit(task) = its top `fraction` of heads by SAE node score;
- overlap = |A n B| / |A u B| (Jaccard) and |A n B| / |A|, next to the chance value k^2 / n for two
  random k-head sets out of n;
- intervention: the shared heads in the middle layers (`mid` = the middle third by default, where the
  paper's inhibition heads sit), edited at the last position of Colored Objects prompts: mean-ablated,
  amplified (mean + 2 (out - mean)), or steered toward their IOI activity (out + (mean on IOI positives -
  mean on IOI negatives)); the Colored Objects accuracy change is measured;
- `attend_to_foils`: the transfer intervention on IOI's inhibition heads (from path patching): at the last
  position they attend to the wrong listed colors, as IOI's S-inhibition heads attend to the subject.
"""
from __future__ import annotations

import torch

from blockattn.analysis import circuits


def overlap(a, b) -> dict:
    """Overlap of two head sets: intersection size, Jaccard |A n B| / |A u B| and |A n B| / |A|."""
    a, b = set(a), set(b)
    if not a:
        raise ValueError("a must be a non-empty set of heads")
    inter = len(a & b)
    return dict(intersection=inter, jaccard=inter / len(a | b), of_a=inter / len(a), size_a=len(a), size_b=len(b))


def chance_overlap(k: int, n: int) -> float:
    """Expected |A n B| for two independent uniform k-subsets of n heads."""
    return k * k / n


def shared_mid_heads(ranking_a, ranking_b, k: int, layers: int, *, mid=None, limit: int = 4) -> list:
    """Up to `limit` heads in both top-k sets whose layer is in `mid` (default the middle third of the
    layers), best summed rank first."""
    lo, hi = mid if mid is not None else (layers // 3, 2 * layers // 3)
    top_a, top_b = ranking_a.top(k), ranking_b.top(k)
    rank_a = {h: i for i, h in enumerate(top_a)}
    rank_b = {h: i for i, h in enumerate(top_b)}
    shared = [h for h in top_a if h in rank_b and lo <= h[0] < hi]
    return sorted(shared, key=lambda h: rank_a[h] + rank_b[h])[:limit]


def intervention(model, tokenizer, heads, prompts, *, colored_means, ioi_positive_means, ioi_negative_means) -> list:
    """Colored Objects metrics with `heads` unedited, mean-ablated, amplified x2 about their mean, and
    steered toward their IOI activity, all at the last position (means `[layers, heads, D]`)."""
    def amplify(layer, head, out):
        m = colored_means[layer, head]
        return m + 2.0 * (out - m)

    def steer(layer, head, out):
        return out + (ioi_positive_means[layer, head] - ioi_negative_means[layer, head])

    conditions = [("none", None), ("mean-ablate", circuits.mean_ablation(heads, colored_means)),
                  ("amplify x2", circuits.last_position_edit(heads, amplify)),
                  ("steer to IOI", circuits.last_position_edit(heads, steer))]
    rows = []
    for name, edits in conditions:
        logits = circuits.last_logits(model, tokenizer, prompts, edits=edits)
        rows.append(dict(condition=name, heads=list(heads), **circuits.task_metrics(logits, tokenizer, prompts)))
    return rows


circuit_overlap = overlap  # the package-level name (blockattn.analysis.circuit_overlap)


def foil_positions(tokenizer, prompt) -> list[int]:
    """Token positions of the listed colors other than the answer (their last occurrence: the question comes
    after the few-shot examples)."""
    ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
    out = []
    for word in prompt.candidates:
        if word == prompt.answer:
            continue
        token = circuits.word_id(tokenizer, word)
        where = [i for i, t in enumerate(ids) if t == token]
        if not where:
            raise ValueError(f"{word!r} is not a token of the prompt {prompt.text!r}")
        out.append(where[-1])
    return out


def attend_to_foils(model, tokenizer, heads, prompts, *, batch_size: int = 32) -> dict:
    """Colored Objects metrics with `heads` made to do what IOI's S-inhibition heads do with the subject:
    at the last position each attends uniformly to the wrong listed colors (its output becomes the mean of
    its values there), so the movers downstream are told which colors not to copy. This is our reading of
    Merullo et al.'s repair of four mid-layer heads; the values come from a v_proj forward hook in the same
    forward pass, the replacement goes through the hook API."""
    from blockattn import analysis

    device = next(model.parameters()).device
    layers = model.model.layers
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    group = int(config.num_attention_heads) // int(config.num_key_value_heads)
    dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    values = {}
    handles = [layers[l].self_attn.v_proj.register_forward_hook(lambda m, a, o, l=l: values.__setitem__(l, o))
               for l in {layer for layer, _ in heads}]
    rows = [None] * len(prompts)
    try:
        with torch.no_grad(), circuits._patched(model), analysis.hooks(model) as h:
            for chunk, ids in circuits._batches(tokenizer, prompts, batch_size):
                where = [foil_positions(tokenizer, prompts[i]) for i in chunk]

                def make(layer, head):
                    kv = head // group

                    def f(out):
                        v = values[layer][:, :, kv * dim:(kv + 1) * dim]  # [B, L, D]
                        out = out.clone()
                        for b, pos in enumerate(where):
                            out[b, -1] = v[b, pos].mean(0).to(out.dtype)
                        return out
                    return f
                h.restore()
                h.ablate({(layer, head): make(layer, head) for layer, head in heads})
                logits = model(ids.to(device), logits_to_keep=1).logits[:, -1].float()
                for j, i in enumerate(chunk):
                    rows[i] = logits[j]
    finally:
        for handle in handles:
            handle.remove()
    return circuits.task_metrics(torch.stack(rows), tokenizer, prompts)

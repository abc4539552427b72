"""Circuit component reuse between IOI and Colored Objects (Merullo, Eickhoff, Pavlick, "Circuit Component
Reuse Across Tasks in Transformer Language Models", ICLR 2024, arXiv 2310.08744).

The paper finds each task's circuit with staged path patching, takes the union of the top 2% heads per
stage, reports ~78% overlap of in-circuit heads, and transfers IOI behaviour to Colored Objects by
adjusting four mid-layer (inhibition) heads (49.6% -> 93.7% accuracy on GPT-2 Medium).

Here the circuits are the SAE rankings of `circuits.py` (not path patching: a choice made for cost,
stated wherever results are reported). The rule:
- circuit(task) = its top `fraction` of heads by SAE node score;
- overlap = |A n B| / |A u B| (Jaccard) and |A n B| / |A|, next to the chance value k^2 / n for two
  random k-head sets out of n;
- intervention: the shared heads in the middle layers (`mid` = the middle third by default, where the
  paper's inhibition heads sit), edited at the last position of Colored Objects prompts: mean-ablated,
  amplified (mean + 2 (out - mean)), or steered toward their IOI activity (out + (mean on IOI positives -
  mean on IOI negatives)); the Colored Objects accuracy change is measured.
"""
from __future__ import annotations

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

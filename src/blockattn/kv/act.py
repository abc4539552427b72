"""ACT, the attention calibration technique (Yu et al., "Unveiling and Harnessing Hidden Attention Sinks:
Enhancing Large Language Models without Training through Attention Calibration", ICML 2024; official
code GATECH-EIC/ACT, `models/llama_modelling_aug.py`).

Rule. For a calibrated (layer, query head), on the prompt's causal attention A the column score is
a_j = Σ_i A_ij / (N − j), the mean attention token j receives from the queries that see it; the sinks
are S = {j : a_j > τ} minus its smallest index (the initial sink stays intact). Every row is then
recalibrated: A'_ij = β·A_ij on S, and the removed mass (1 − β)·m_i, m_i = Σ_{j∈S} A_ij, goes to the
other tokens in proportion, so rows still sum to 1. That is out_i = β·m_i·o_S + (1 − β·m_i)·o_N with
o_S, o_N the attention restricted to S and to the rest, computed here from the engine's output and lse
plus the few sink columns (O(N·|S|)). Sinks are found at prefill and kept for decoding (the official
code recomputes a_j from the single decode row, a different statistic; see the notes). The paper picks
the calibrated heads by an offline search; `heads=None` calibrates every head of layers 2 … L − 2, the
official layer range. Nothing is evicted.
"""
from __future__ import annotations

import dataclasses

import torch

import blockattn
from blockattn.kv import register
from blockattn.kv.base import Policy, Selection, attend_head

_CHUNK = 256  # query rows per pass of the column score: O(chunk·N) memory


@register("act")
@dataclasses.dataclass
class ACT(Policy):
    compresses = False

    beta: float = 0.4
    tau: float = 0.1
    heads: list | None = None   # [(layer, query_head), ...]; None: every head of layers 2 … L − 2

    def __post_init__(self):
        for name, low, high in (("beta", 0.0, 1.0), ("tau", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
        self.sinks_found: dict[int, list[list[torch.Tensor]]] = {}

    def setup(self, model, runtime):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        chosen = self.heads if self.heads is not None else [(l, h) for l in range(2, layers - 1) for h in range(heads)]
        self._calibrated = {}
        for layer, head in chosen:
            self._calibrated.setdefault(int(layer), set()).add(int(head))

    def select(self, layer, query, key, value, scale):
        batch, heads, n, _ = key.shape
        return Selection([torch.arange(n, device=key.device).expand(batch, n)] * heads)

    def prefill_attend(self, cache, layer, query, key, value, scale, backend):
        heads = self._calibrated.get(layer)
        if not heads:
            return None
        out, lse = blockattn.attention(query, key, value, blockattn.patterns.causal(query.shape[2]), scale=scale,
                                       return_lse=True, backend=backend)
        group = query.shape[1] // key.shape[1]
        sinks = [[_empty(query) for _ in range(query.shape[1])] for _ in range(query.shape[0])]
        for b in range(query.shape[0]):
            for h in sorted(heads):
                found = find_sinks(query[b, h], key[b, h // group], lse[b, h], scale, self.tau)
                sinks[b][h] = found
                if found.numel():
                    out[b, h] = calibrate(out[b, h], lse[b, h], query[b, h], key[b, h // group],
                                          value[b, h // group], found, scale, self.beta)
        cache.scratch[("act", layer)] = sinks
        self.sinks_found[layer] = sinks
        return out

    def attend(self, cache, state, layer, query, scale, backend):
        sinks = cache.scratch.get(("act", layer))
        if sinks is None:
            return super().attend(cache, state, layer, query, scale, backend)
        heads = len(state.head_keys)
        group = query.shape[1] // heads
        outs = []
        for h in range(heads):
            q = query[:, h * group:(h + 1) * group]
            out, lse = attend_head(q, state.head_keys[h], state.head_values[h], scale, backend, return_lse=True)
            for b in range(query.shape[0]):
                for g in range(group):
                    found = sinks[b][h * group + g]
                    if found.numel():
                        out[b, g] = calibrate(out[b, g], lse[b, g], q[b, g], state.head_keys[h][b],
                                              state.head_values[h][b], found, scale, self.beta)
            outs.append(out)
        return torch.cat(outs, dim=1)


def _empty(like):
    return torch.zeros(0, dtype=torch.long, device=like.device)


def find_sinks(query, key, lse, scale: float, tau: float) -> torch.Tensor:
    """One head's prompt: `query [N, D]`, `key [N, D]`, row `lse [N]` -> sorted sink positions, the
    smallest one exempt. The column sums stream over query chunks (no [N, N] tensor)."""
    n = key.shape[0]
    received = torch.zeros(n, dtype=torch.float32, device=key.device)
    cols = torch.arange(n, device=key.device)
    for start in range(0, n, _CHUNK):
        rows = torch.arange(start, min(start + _CHUNK, n), device=key.device)
        logits = (query[rows].float() @ key.float().T) * scale - lse[rows, None].float()
        received += logits.exp().masked_fill(cols > rows[:, None], 0.0).sum(0)
    score = received / (n - cols).float()
    return (score > tau).nonzero().flatten()[1:]


def calibrate(out, lse, query, key, value, sinks, scale: float, beta: float):
    """Recalibrate one head's rows: `out [Lq, D]` (attention over `key, value [n, D]`, the queries being the
    last Lq tokens) and its `lse [Lq]` -> β·m·o_S + (1 − β·m)·o_N."""
    q_len, n = query.shape[0], key.shape[0]
    logits = (query.float() @ key[sinks].float().T) * scale                 # [Lq, |S|]
    visible = sinks[None, :] <= (n - q_len + torch.arange(q_len, device=key.device))[:, None]
    probs = (logits - lse[:, None].float()).exp() * visible                  # A_ij on the sinks
    mass = probs.sum(-1, keepdim=True)                                       # m_i
    on_sinks = probs @ value[sinks].float()                                  # m_i·o_S
    rest = out.float() - on_sinks                                            # (1 − m_i)·o_N
    fixed = beta * on_sinks + rest * (1 - beta * mass) / (1 - mass).clamp_min(1e-30)
    return fixed.to(out.dtype)

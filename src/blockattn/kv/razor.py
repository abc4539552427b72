"""RazorAttention (Tang et al., "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads",
ICLR 2025). No official code; head search as in Huawei's golden-stick / msModelSlim toolkits, compression
as the paper's Algorithm 1 (notes: shared/methods/decode-kv.md §2).

Rule. A probe of R random token ids (uniform in [10000, 12500]) repeated 4 times after BOS runs through
the model once; for every query head the echo score is the mean attention A[i, i − mR] and the induction
score the mean A[i, i − mR + 1] over the positions i of copies 2…4 and earlier copies m; a KV head scores
the max over its GQA group. The top 14% of all L·H_kv KV heads by induction and the top 1% by echo are
retrieval heads and keep their full cache. Every other head keeps `sink` first tokens and a recent window
and folds the dropped middle into one compensation token k̂ = mean k, v̂ = mean v, attended with logit
q·k̂/√d + log N_d (eq. 5: it stands for the N_d tokens it replaces). The window is the paper's
max(S_0, N/C) by default; with `ratio` it is sized so that the whole cache (retrieval heads at full
length included) drops by `ratio`.

Hybrid models (Gemma 3): the policy governs only `runtime.policy_layers` (the full-attention layers; a
sliding layer keeps its window whatever the policy says), so the head fractions, the choice of retrieval
heads and the `ratio` budget are all counted over the governed layers' KV heads only. When every governed
head is a retrieval head nothing is compressed: setup warns and `note` says so.
"""
from __future__ import annotations

import dataclasses
import random
import warnings

import torch

import blockattn
from blockattn.kv import register
from blockattn.kv.base import Policy, Selection, check_int, check_ratio

PROBE_LOW, PROBE_HIGH = 10000, 12500


@register("razor")
@dataclasses.dataclass
class RazorAttention(Policy):
    ratio: float | None = None
    induction_ratio: float = 0.14
    echo_ratio: float = 0.01
    sink: int = 4
    buffer: int = 4000          # S_0
    compression: int = 5        # C
    compensate: bool = True
    probe_period: int | None = None   # R; None: 2500, shrunk so that 4R + 1 fits the model's context
    seed: int = 2025
    retrieval_heads: list | None = None   # [(layer, kv_head), ...]; None: found by the probe at patch time

    def __post_init__(self):
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        for name in ("induction_ratio", "echo_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
        check_int("sink", self.sink, 0)
        check_int("buffer", self.buffer, 1)
        check_int("compression", self.compression, 1)
        if self.probe_period is not None:
            check_int("probe_period", self.probe_period, 2)
        self.scores = None   # (echo, induction), each [L, H_kv], after the probe
        self.note = None     # set at setup when the policy cannot compress (every governed head retrieval)

    # ------------------------------------------------------------------ head search
    def setup(self, model, runtime):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.layers, self.kv_heads = config.num_hidden_layers, getattr(config, "num_key_value_heads",
                                                                       config.num_attention_heads)
        # the layers this policy decides for; sliding layers keep their window and are no part of the budget
        governed = getattr(runtime, "policy_layers", None)
        self.governed = list(governed) if governed is not None else list(range(self.layers))
        heads = len(self.governed) * self.kv_heads
        if self.retrieval_heads is not None:
            self._retrieval = {tuple(h) for h in self.retrieval_heads}
        elif round(self.induction_ratio * heads) == round(self.echo_ratio * heads) == 0:
            # too few governed heads for any fraction to round to one (Gemma 3 270M: 14 % of 3): no probe to run
            self._retrieval, self.retrieval_heads = set(), []
        else:
            echo, induction = probe_scores(model, runtime, self.probe_period, self.seed)
            self.scores = (echo, induction)
            self._retrieval = choose_heads(echo, induction, self.induction_ratio, self.echo_ratio,
                                           layers=self.governed)
            self.retrieval_heads = sorted(self._retrieval)
        total, full = self._counts()
        self.note = None
        if full == total:
            self.note = (f"razor: every governed KV head ({full} of {total}, layers {self.governed}) is a retrieval "
                         f"head, so nothing is compressed" +
                         (f" and ratio={self.ratio} is not reached" if self.ratio is not None else ""))
            warnings.warn(self.note, stacklevel=2)

    def _counts(self) -> tuple[int, int]:
        """(governed KV heads, retrieval heads among them): what the budget is counted over."""
        governed = set(self.governed)
        return len(governed) * self.kv_heads, sum(1 for layer, _ in self._retrieval if layer in governed)

    # ------------------------------------------------------------------ compression
    def window(self, n: int) -> int:
        """Recent tokens a non-retrieval head keeps out of `n` (its budget minus sinks and the compensation slot)."""
        if self.ratio is None:
            return max(self.buffer, n // self.compression)
        total, full = self._counts()
        if full == total:
            return n
        # full·n + (total − full)·b = (1 − ratio)·total·n, b = sink + window + the compensation slot
        per_head = int(((1 - self.ratio) * total * n - full * n) / (total - full))
        window = per_head - self.sink - int(self.compensate)
        if window < 1:
            raise ValueError(f"razor: at ratio={self.ratio} with {full} of {total} heads kept full, the other heads' "
                             f"budget of {per_head} tokens (n = {n}) is smaller than sink + window + compensation = "
                             f"{self.sink} + 1 + {int(self.compensate)}")
        return window

    def select(self, layer, query, key, value, scale):
        if not hasattr(self, "_retrieval"):
            raise RuntimeError("razor: the policy was not set up; pass it to blockattn.hf.patch(model, kv=...)")
        batch, heads, n, _ = key.shape
        window = self.window(n)
        everything = torch.arange(n, device=key.device).expand(batch, n)
        if self.sink + window >= n:
            return Selection([everything] * heads)
        squeezed = torch.cat([torch.arange(self.sink, device=key.device),
                              torch.arange(n - window, n, device=key.device)]).expand(batch, -1)
        keep, comp = [], []
        for h in range(heads):
            full = (layer, h) in self._retrieval
            keep.append(everything if full else squeezed)
            comp.append(self.compensate and not full)
        return Selection(keep, compensate=comp)


def probe_ids(vocab: int, period: int, seed: int, bos: int | None) -> torch.Tensor:
    """BOS + `period` random ids in [10000, 12500] (clipped to the vocabulary) repeated 4 times: `[1, 4R(+1)]`."""
    low, high = (PROBE_LOW, PROBE_HIGH) if vocab > PROBE_HIGH else (0, vocab - 1)
    rng = random.Random(seed)
    copy = [rng.randint(low, high) for _ in range(period)]
    return torch.tensor([([] if bos is None else [bos]) + copy * 4])


def probe_scores(model, runtime, period: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores `[L, H_kv]` (max over each GQA group) from one pass over the probe."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_pos = getattr(config, "max_position_embeddings", 10001) or 10001
    period = period if period is not None else min(2500, (max_pos - 1) // 4)
    bos = getattr(config, "bos_token_id", None)
    ids = probe_ids(config.vocab_size, period, seed, bos if isinstance(bos, int) else None)
    offset = ids.shape[1] - 4 * period
    layers, kv_heads = config.num_hidden_layers, getattr(config, "num_key_value_heads", config.num_attention_heads)
    echo = torch.zeros(layers, kv_heads)
    induction = torch.zeros(layers, kv_heads)

    def observe(layer, query, key, value, scale):
        e, i = echo_induction(query[:1], key[:1], period, offset, scale)
        group = query.shape[1] // key.shape[1]
        echo[layer] = e.view(key.shape[1], group).amax(1).cpu()
        induction[layer] = i.view(key.shape[1], group).amax(1).cpu()

    runtime.observer = observe
    try:
        with torch.no_grad():
            model(ids.to(model.device), use_cache=False)
    finally:
        runtime.observer = None
    return echo, induction


def echo_induction(query, key, period: int, offset: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head, mean A[i, i − mR] and mean A[i, i − mR + 1] over i in copies 2…4, m = 1…copy index.
    A's row normaliser comes from the engine's lse, so no [L, L] matrix is formed: `([Hq], [Hq])`."""
    n = key.shape[2]
    group = query.shape[1] // key.shape[1]
    _, lse = blockattn.attention(query, key, key, blockattn.patterns.causal(n), scale=scale, return_lse=True)
    rows, cols_echo = [], []
    for copy in range(1, 4):
        for m in range(1, copy + 1):
            i = torch.arange(offset + copy * period, offset + (copy + 1) * period, device=key.device)
            rows.append(i)
            cols_echo.append(i - m * period)
    rows, cols_echo = torch.cat(rows), torch.cat(cols_echo)
    k = key[0].repeat_interleave(group, 0).float()          # [Hq, n, D]
    q = query[0].float()
    lse = lse[0]

    def mean_prob(cols):
        logits = (q[:, rows] * k[:, cols]).sum(-1) * scale
        return (logits - lse[:, rows]).exp().mean(-1)

    return mean_prob(cols_echo), mean_prob(cols_echo + 1)


def choose_heads(echo, induction, induction_ratio: float, echo_ratio: float,
                 layers=None) -> set[tuple[int, int]]:
    """Top round(induction_ratio·N) heads by induction ∪ top round(echo_ratio·N) by echo, over the N
    KV heads of `layers` (None: all L·H_kv)."""
    layers = list(range(echo.shape[0])) if layers is None else sorted(layers)
    rows = torch.tensor(layers, dtype=torch.long)
    total = len(layers) * echo.shape[1]
    heads = set()
    for scores, fraction in ((induction, induction_ratio), (echo, echo_ratio)):
        count = round(fraction * total)
        if count:
            for flat in scores[rows].flatten().topk(count).indices.tolist():
                row, head = divmod(flat, scores.shape[1])
                heads.add((layers[row], head))
    return heads

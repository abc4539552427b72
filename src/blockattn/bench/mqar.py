"""Multi-query associative recall (MQAR, Zoology) and a small harness that trains any token mixer on it.

Paper: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models" (ICLR 2024). An example is `num_kv_pairs` key-value pairs (keys from [1, V/2), values
from [V/2, V), distinct within an example) followed by queries: each key is asked once, at a
distance drawn from a power law (p(gap = i) ∝ a·i^(a−1), a = 0.01 by default, so most queries
come soon after the context and a few far away); the label at a query position is the key's
value, every other position is ignored (-100); the remaining positions hold random tokens.

`MIXERS` maps a name to a factory `(d_model, layer) -> nn.Module` whose module maps
`[B, L, d_model]` to `[B, L, d_model]` causally; adding a mixer is one line.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from blockattn.linear.memory_mixers import memory_mixer

IGNORE = -100


def multiquery_ar(num_examples: int, *, vocab_size: int = 8192, input_seq_len: int = 64, num_kv_pairs: int = 4,
                  power_a: float = 0.01, random_non_queries: bool = True, seed: int = 0):
    """Zoology's MQAR examples: `(inputs [N, L] int64, labels [N, L] int64)`, labels -100 except at queries.

    The layout follows Zoology's generator: pairs at positions 0..2N−1; the query for the key
    of pair j sits at 2N + 2·gap_j with distinct gaps drawn from the power law over
    `(L − 2N) // 2` slots; the label at that position is pair j's value.
    """
    for name, value in (("num_examples", num_examples), ("vocab_size", vocab_size),
                        ("input_seq_len", input_seq_len), ("num_kv_pairs", num_kv_pairs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if input_seq_len % 2:
        raise ValueError(f"input_seq_len must be even, got {input_seq_len}")
    if vocab_size <= input_seq_len:
        raise ValueError(f"vocab_size must exceed input_seq_len ({input_seq_len}), got {vocab_size}")
    if num_kv_pairs * 4 > input_seq_len:
        raise ValueError(f"num_kv_pairs * 4 must be <= input_seq_len ({input_seq_len}), got num_kv_pairs={num_kv_pairs}")
    if num_kv_pairs >= vocab_size // 2:
        raise ValueError(f"num_kv_pairs must be < vocab_size // 2 - 1 distinct keys, got {num_kv_pairs}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must lie in (0, 1], got {power_a}")
    rng = np.random.default_rng(seed)
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    keys = np.stack([rng.choice(np.arange(1, half), size=num_kv_pairs, replace=False) for _ in range(num_examples)])
    values = np.stack([rng.choice(np.arange(half, vocab_size), size=num_kv_pairs, replace=False)
                       for _ in range(num_examples)])
    space = (input_seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    p = p / p.sum()
    gaps = np.stack([rng.choice(space, size=num_kv_pairs, replace=False, p=p) for _ in range(num_examples)])
    inputs = np.zeros((num_examples, input_seq_len), dtype=np.int64)
    labels = np.full((num_examples, input_seq_len), IGNORE, dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(labels, query_pos, values, axis=1)
    inputs, labels = torch.from_numpy(inputs), torch.from_numpy(labels)
    if random_non_queries:
        filler = torch.from_numpy(rng.integers(0, vocab_size, size=inputs.shape))
        inputs = torch.where(inputs == 0, filler, inputs)
    return inputs, labels


# --------------------------------------------------------------------------------------------- mixers

class _Heads(nn.Module):
    """q, k, v projections split into heads, and the output projection."""

    def __init__(self, d_model: int, heads: int, qk_dim: int | None = None):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads, self.head_dim = heads, d_model // heads
        self.qk_dim = qk_dim or self.head_dim
        self.q = nn.Linear(d_model, heads * self.qk_dim, bias=False)
        self.k = nn.Linear(d_model, heads * self.qk_dim, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def split(self, x):
        b, length, _ = x.shape
        return [t.view(b, length, self.heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v(x))]

    def merge(self, y):
        b, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, length, -1))


class SoftmaxMixer(_Heads):
    """Softmax attention through the engine on a causal or sliding-window layout."""

    def __init__(self, d_model: int, heads: int = 1, window: int | None = None):
        super().__init__(d_model, heads)
        self.window = window

    def forward(self, x):
        import blockattn
        q, k, v = self.split(x)
        length = x.shape[1]
        layout = (blockattn.patterns.causal(length) if self.window is None
                  else blockattn.patterns.sliding_window(length, window=self.window))
        return self.merge(blockattn.attention(q, k, v, layout))


class SparseMixer(_Heads):
    """A registered block-sparse method selecting its layout from q, k on every call."""

    def __init__(self, d_model: int, method: str, heads: int = 1, **params):
        super().__init__(d_model, heads)
        self.method, self.params = method, params

    def forward(self, x):
        import blockattn
        q, k, v = self.split(x)
        return self.merge(blockattn.sparse_attention(q, k, v, self.method, **self.params))


def alibi_slopes(heads: int) -> list[float]:
    """ALiBi's per-head slopes (TransNormerLLM / lightning-attention `_build_slope_tensor`)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:heads - closest]


def tnl_decays(heads: int, layer: int, layers: int) -> tuple[float, ...]:
    """TransNormerLLM's decays λ_h = exp(−s_h · (1 − l/(layers−1) + 1e−5)): ALiBi slopes shrinking with depth,
    so the last layer barely forgets."""
    factor = 1 - layer / (layers - 1) + 1e-5 if layers > 1 else 1.0
    return tuple(math.exp(-s * factor) for s in alibi_slopes(heads))


class LightningMixer(_Heads):
    """TransNormerLLM-style layer: Lightning attention with per-head decays, RMS-normed output and, with
    `output_gate`, TNL's sigmoid output gate o ⊙ σ(W_u x) (`tnl_attn.py`). `decays=None` gives plain
    causal linear attention (λ = 1)."""

    def __init__(self, d_model: int, heads: int = 1, decays: tuple[float, ...] | None = None,
                 output_gate: bool = False):
        super().__init__(d_model, heads)
        self.register_buffer("decay", torch.tensor(decays if decays is not None else [1.0] * heads))
        self.norm = nn.RMSNorm(self.head_dim)
        self.gate = nn.Linear(d_model, d_model, bias=False) if output_gate else None

    def forward(self, x):
        from blockattn.linear import lightning_attention
        q, k, v = self.split(x)
        q, k = nn.functional.silu(q), nn.functional.silu(k)  # TransNormerLLM's kernel on q and k
        y = self.norm(lightning_attention(q, k, v, self.decay, block_size=16))
        if self.gate is not None:
            b, length, _ = x.shape
            y = y * torch.sigmoid(self.gate(x)).view(b, length, self.heads, -1).transpose(1, 2)
        return self.merge(y)


class BasedMixer(_Heads):
    """`based()` in one layer: the Taylor linear branch (q, k projected to `feature_dim`) plus a sliding softmax
    window of `window` tokens (self included), summed. Not the official layout (see `based_layer`)."""

    def __init__(self, d_model: int, heads: int = 1, feature_dim: int = 16, window: int = 64):
        super().__init__(d_model, heads, qk_dim=feature_dim)
        self.window = window
        self.local = SoftmaxMixer(d_model, heads, window=window)

    def forward(self, x):
        from blockattn.linear import taylor_linear_attention
        q, k, v = self.split(x)
        return self.merge(taylor_linear_attention(q, k, v, block_size=16)) + self.local(x)


class TaylorLinearMixer(_Heads):
    """BASED's linear attention layer (`LinearAttention`): Taylor feature map on `feature_dim`-wide q, k,
    values at the head width."""

    def __init__(self, d_model: int, heads: int = 1, feature_dim: int = 16):
        super().__init__(d_model, heads, qk_dim=feature_dim)

    def forward(self, x):
        from blockattn.linear import taylor_linear_attention
        return self.merge(taylor_linear_attention(*self.split(x), block_size=16))


class BaseConvMixer(nn.Module):
    """Zoology's BaseConv: projection(u) ⊙ conv(u), with a short causal depthwise conv (Zoology's
    `kernel_size` 3 option; its MQAR runs use an implicit long conv). The block adds the residual."""

    def __init__(self, d_model: int, kernel_size: int = 3):
        super().__init__()
        self.projection = nn.Linear(d_model, d_model)
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x):
        conv = self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)
        return self.projection(x) * conv


def based_layer(d_model: int, layer: int, window: int) -> nn.Module:
    """The official BASED stack interleaves separate layers (`based-360m.yaml`: BaseConv, then linear
    attention, then sliding-window attention); in two layers: linear attention, then a sliding window of
    `window` previous tokens plus self (BASED's convention: `SlidingAttention(window_size=2W)` passes the
    flash window (W, 0)), with this model's short conv in front of both standing in for BaseConv."""
    return TaylorLinearMixer(d_model) if layer % 2 == 0 else SoftmaxMixer(d_model, window=window + 1)


class RATMixer(_Heads):
    """RAT layer (`rat.py`): forget gate f = σ(W_f x + b) with the official init b = log U(1, C−1) (so a
    chunk summary spans several tokens at init), chunked recurrence + attention over chunk summaries,
    RoPE over the chunk index on q and the summary keys ("interrope"), output gate σ(W_z x) ⊙ out.
    The model's pre-norm plays the official input RMSNorm; q/k are per head (official: 2 shared groups).
    `paper=False` gives the bare layer (default-initialised gate, no RoPE, no output gate)."""

    def __init__(self, d_model: int, heads: int = 1, chunk_size: int = 16, paper: bool = True):
        super().__init__(d_model, heads)
        self.chunk_size, self.paper = chunk_size, paper
        self.forget = nn.Linear(d_model, d_model)
        if paper:
            with torch.no_grad():
                self.forget.bias.copy_(torch.empty(d_model).uniform_(1, max(chunk_size - 1, 1)).log())
            self.gate = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        from blockattn.linear import rat
        q, k, v = self.split(x)
        b, length, _ = x.shape
        f = torch.sigmoid(self.forget(x)).view(b, length, self.heads, -1).transpose(1, 2)
        y = rat(q, k, v, f, chunk_size=self.chunk_size, chunk_rope=self.paper)
        if self.paper:
            y = y * torch.sigmoid(self.gate(x)).view(b, length, self.heads, -1).transpose(1, 2)
        return self.merge(y)


class BlockTransformerMixer(_Heads):
    """Block Transformer in one layer, the paper's "summation" context strategy: a concatenating embedder
    (Linear over the block's `block_size` token vectors, `projection_method: concat`), causal softmax over
    block embeddings (block decoder), an expansion Linear to one context vector per position, and local
    attention inside each block (token decoder) over the input plus the previous block's context.
    `embedder="mean"` instead runs the `block_transformer` op (mean-pooled, permutation-invariant blocks,
    context added to the output)."""

    def __init__(self, d_model: int, heads: int = 1, block_size: int = 4, embedder: str = "concat"):
        super().__init__(d_model, heads)
        if embedder not in ("concat", "mean"):
            raise ValueError(f"embedder must be 'concat' or 'mean', got {embedder!r}")
        self.block_size, self.embedder = block_size, embedder
        if embedder == "concat":
            self.embed = nn.Linear(block_size * d_model, d_model, bias=False)
            self.block_decoder = _Heads(d_model, heads)
            self.expand = nn.Linear(d_model, block_size * d_model, bias=False)

    def forward(self, x):
        import blockattn
        from blockattn.linear import block_transformer
        if self.embedder == "mean":
            return self.merge(block_transformer(*self.split(x), block_size=self.block_size))
        b, length, d = x.shape
        n = length // self.block_size
        if length % self.block_size:
            raise ValueError(f"sequence length ({length}) must be a multiple of block_size ({self.block_size})")
        blocks = self.embed(x.reshape(b, n, self.block_size * d))
        dec = self.block_decoder
        context = dec.merge(blockattn.attention(*dec.split(blocks), blockattn.patterns.causal(n)))
        # block j is decoded from the context of blocks < j: shift by one block, the first gets none
        context = torch.cat([torch.zeros_like(context[:, :1]), context[:, :-1]], dim=1)
        x = x + self.expand(context).reshape(b, length, d)
        inside = blockattn.BlockLayout.from_dense(torch.eye(n, dtype=torch.bool, device=x.device), q_len=length,
                                                  k_len=length, block_q=self.block_size, block_k=self.block_size,
                                                  causal=True)
        return self.merge(blockattn.attention(*self.split(x), inside))


# Scale-down (L = 64 instead of Zoology's 64..512 and BASED's 2048): BASED's 64-token window at 2k
# is 1/32 of the sequence; here the sliding windows and BASED's window are 4 tokens (1/16 of L),
# far shorter than the key-query distances (median 32 tokens, under 8 in ~0.02% of queries with these
# defaults: 16 pairs fill all 16 query slots); RAT keeps its paper chunk of 16.
WINDOW = 4
MIXERS: dict[str, Callable[[int, int], nn.Module]] = {
    "attention": lambda d, layer: SoftmaxMixer(d),
    "sliding_window": lambda d, layer: SoftmaxMixer(d, window=WINDOW),
    "linear": lambda d, layer: LightningMixer(d),
    # TransNormerLLM's slope schedule over the 2 layers and its output gate
    "lightning": lambda d, layer: LightningMixer(d, heads=2, decays=tnl_decays(2, layer, 2), output_gate=True),
    "lightning_fixed": lambda d, layer: LightningMixer(d, heads=2, decays=(1 - 2 ** -5, 1 - 2 ** -6)),
    "based": lambda d, layer: based_layer(d, layer, WINDOW),
    "based_zoology": lambda d, layer: BaseConvMixer(d) if layer == 0 else TaylorLinearMixer(d),
    "based_summed": lambda d, layer: BasedMixer(d, window=WINDOW),
    "rat": lambda d, layer: RATMixer(d),
    "rat_bare": lambda d, layer: RATMixer(d, paper=False),
    "rat_hybrid": lambda d, layer: SoftmaxMixer(d, window=WINDOW) if layer == 0 else RATMixer(d),
    "block_transformer": lambda d, layer: BlockTransformerMixer(d),
    "block_transformer_mean": lambda d, layer: BlockTransformerMixer(d, embedder="mean"),
    "moba": lambda d, layer: SparseMixer(d, "moba", block_size=8, top_k=2, tile_size=8),
    "titans_mac": lambda d, layer: memory_mixer("titans_mac", d, window=WINDOW),
    "titans_mag": lambda d, layer: memory_mixer("titans_mag", d, window=WINDOW),
    "titans_mal": lambda d, layer: memory_mixer("titans_mal", d, window=WINDOW),
    "moneta": lambda d, layer: memory_mixer("moneta", d, window=WINDOW),
    "yaad": lambda d, layer: memory_mixer("yaad", d, window=WINDOW),
    "memora": lambda d, layer: memory_mixer("memora", d, window=WINDOW),
}
# What `blockattn mqar` trains by default: the Titans/Miras memory mixers are left out (several times
# slower per step than the others on CPU); name them with --mixers to include them.
DEFAULT_MIXERS = ["attention", "sliding_window", "linear", "lightning", "based", "rat", "rat_hybrid",
                  "block_transformer", "moba"]


# --------------------------------------------------------------------------------------------- model

class MQARModel(nn.Module):
    """Zoology-style 2-layer LM: embeddings, then per layer (short causal conv, mixer, MLP), each residual.

    The short depthwise causal convolution in front of every mixer stands in for the short convs of
    Zoology's/BASED's layers; it lets a tiny CPU-trained model form the key→value shift quickly."""

    def __init__(self, mixer: str, *, vocab_size: int, d_model: int, seq_len: int, layers: int = 2, conv: int = 4):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {sorted(MIXERS)}, got {mixer!r}")
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.convs = nn.ModuleList(nn.Conv1d(d_model, d_model, conv, groups=d_model, padding=conv - 1)
                                   for _ in range(layers))
        self.mixers = nn.ModuleList(MIXERS[mixer](d_model, i) for i in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
                                  for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3 * layers))
        self.final = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.embed(tokens) + self.pos(torch.arange(length, device=tokens.device))
        for i, (conv, mixer, mlp) in enumerate(zip(self.convs, self.mixers, self.mlps)):
            h = self.norms[3 * i](x).transpose(1, 2)
            x = x + conv(h)[..., :length].transpose(1, 2)
            x = x + mixer(self.norms[3 * i + 1](x))
            x = x + mlp(self.norms[3 * i + 2](x))
        return self.head(self.final(x))


@dataclasses.dataclass
class MQARConfig:
    """Scaled-down MQAR settings (Zoology: V = 8192, L = 64..512, N = 4..64, 100k examples, 64 epochs, lr sweep).

    L = 64 with N = 16 pairs is the densest packing the generator allows (4N <= L), four times
    Zoology's density (its figure-2 sweep uses N = L/16: (64, 4), (128, 8), (256, 16)); the vocabulary
    is 256 (Zoology: 8,192) and training is 20k examples x 4 epochs (1,248 AdamW steps, batch 64; 10% linear warm-up, cosine decay).
    `lr=None` takes `default_lr(d_model)`: 1e-2 up to d_model 32, 3e-3 above, picked from short
    attention runs at 1e-3 / 3e-3 / 1e-2 (at d 16-32 only 1e-2 leaves MQAR's loss plateau within
    budget; at d 64, 1e-2 stalls and 3e-3 solves it); the same lr is used for every mixer."""
    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 16
    train_examples: int = 20000
    test_examples: int = 1000
    epochs: int = 4
    batch_size: int = 64
    lr: float | None = None
    seed: int = 0


def default_lr(d_model: int) -> float:
    """Learning rate used when `MQARConfig.lr` is None (see `MQARConfig`)."""
    return 1e-2 if d_model <= 32 else 3e-3


def accuracy(model: nn.Module, inputs, labels, batch_size: int = 250) -> float:
    """Fraction of query positions whose value the model predicts exactly."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start:start + batch_size])
            target = labels[start:start + batch_size]
            mask = target != IGNORE
            correct += (logits.argmax(-1)[mask] == target[mask]).sum().item()
            total += mask.sum().item()
    model.train()
    return correct / max(total, 1)


@functools.lru_cache(maxsize=2)
def _datasets(vocab_size, seq_len, num_kv_pairs, train_examples, test_examples, seed):
    """Train and test sets (test from seed + 10), cached so a run over many mixers generates them once."""
    data = dict(vocab_size=vocab_size, input_seq_len=seq_len, num_kv_pairs=num_kv_pairs)
    return (*multiquery_ar(train_examples, seed=seed, **data), *multiquery_ar(test_examples, seed=seed + 10, **data))


def train_mqar(mixer: str, d_model: int, config: MQARConfig = MQARConfig(), progress=None) -> dict:
    """Train a fresh 2-layer model with `mixer` on MQAR; returns accuracy, seconds and parameter count."""
    train_x, train_y, test_x, test_y = _datasets(config.vocab_size, config.seq_len, config.num_kv_pairs,
                                                 config.train_examples, config.test_examples, config.seed)
    torch.manual_seed(config.seed)
    model = MQARModel(mixer, vocab_size=config.vocab_size, d_model=d_model, seq_len=config.seq_len)
    steps = config.epochs * (config.train_examples // config.batch_size)
    lr = default_lr(d_model) if config.lr is None else config.lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.perf_counter()
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(config.train_examples)
        for first in range(0, config.train_examples - config.batch_size + 1, config.batch_size):
            idx = order[first:first + config.batch_size]
            logits = model(train_x[idx])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), train_y[idx].flatten(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if progress is not None:
                progress.update(1)
    return {"mixer": mixer, "d_model": d_model, "accuracy": accuracy(model, test_x, test_y),
            "seconds": time.perf_counter() - start, "params": sum(p.numel() for p in model.parameters()),
            "steps": step, "settings": dataclasses.asdict(config) | {"lr": lr}}


def format_table(results: list[dict]) -> str:
    dims = sorted({r["d_model"] for r in results})
    mixers = list(dict.fromkeys(r["mixer"] for r in results))
    acc = {(r["mixer"], r["d_model"]): r["accuracy"] for r in results}
    lines = ["| mixer | " + " | ".join(f"d={d}" for d in dims) + " |", "|---" * (len(dims) + 1) + "|"]
    for m in mixers:
        cells = [f"{acc[(m, d)]:.3f}" if (m, d) in acc else "" for d in dims]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(results: list[dict], path: str) -> str:
    """PNG of test accuracy against d_model, one line per mixer.

    A row with a `"note"` (e.g. a rerun, or a shorter schedule) is drawn with a large marker, one
    shape per distinct note, and its mixer's legend entry carries the note, so rows from different
    runs stay apart on one plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    mixers = list(dict.fromkeys(r["mixer"] for r in results))
    colours = plt.get_cmap("tab20" if len(mixers) > 10 else "tab10")
    shapes = dict(zip(dict.fromkeys(r["note"] for r in results if r.get("note")), "*DXPv^<>"))
    for n, m in enumerate(mixers):
        rows = sorted((r for r in results if r["mixer"] == m), key=lambda r: r["d_model"])
        notes = list(dict.fromkeys(r["note"] for r in rows if r.get("note")))
        label = m + (f" ({'; '.join(notes)})" if notes else "")
        colour = colours(n % colours.N)
        # a mixer measured only in one noted run shows that run's marker in the legend too
        shape = shapes[notes[0]] if len(notes) == 1 and all(r.get("note") for r in rows) else "o"
        ax.plot([r["d_model"] for r in rows], [r["accuracy"] for r in rows], marker=shape, color=colour, label=label)
        for note in notes:
            marked = [r for r in rows if r.get("note") == note]
            ax.plot([r["d_model"] for r in marked], [r["accuracy"] for r in marked], linestyle="none",
                    marker=shapes.get(note, "*"), markersize=11, color=colour, markeredgecolor="black",
                    markeredgewidth=0.6)
    dims = sorted({r["d_model"] for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("d_model")
    ax.set_ylabel("MQAR accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

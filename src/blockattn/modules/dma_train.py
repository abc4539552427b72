"""DMA trained here on MQAR against its dense twin and a sliding window of the same key budget
(`blockattn train dma`).

MQAR (Zoology's generator, `blockattn.bench.mqar`): L = 64, 4 pairs, vocabulary 128, 600 AdamW
steps of 64 (lr 3e-3), scaled down from the notes' L = 256 so three models train in minutes here.
The same 2-layer decoder (RoPE, d_model 64, 2 heads, 4-wide causal conv, and by default learned
absolute position embeddings as in the paper's own MQAR model: Zoology's `max_position_embeddings`)
with three attentions: dense causal, a sliding window of `window` keys (self included), and DMA
keeping its `window` keys of largest learned bias per query. The paper's MQAR claim in miniature is
DMA ≈ dense ≫ window at the same per-row budget. The masks are also scored against the DMA model's
own unmasked attention (softmax of logits + bias over every earlier key): the share of that mass its
kept keys hold, beside a random set and the last-`window` keys of the same size per row.

Measured (docs/bench/trainable.md): the bias is query-independent and computed from the values
alone, so it must tell the real pairs (at the start) from the value-looking pairs the random filler
draws. Without position embeddings it cannot (DMA within 2 points of dense only at window 32 of 64);
with them, the position is in every value and window 8 of 64 is enough.
"""
from __future__ import annotations

import torch
from torch import nn

import blockattn
from blockattn.bench.mqar import multiquery_ar
from blockattn.layout import BlockLayout
from blockattn.modules._tiny_lm import TinyDecoder, fit
from blockattn.modules.dma import DMAAttention, keep_thresholds

MODELS = ("dense", "window", "dma")


class _LayoutMixer(nn.Module):
    def __init__(self, window: int | None, block: int, backend: str):
        super().__init__()
        self.window, self.block, self.backend = window, block, backend
        self._layouts: dict[int, BlockLayout] = {}

    def forward(self, q, k, v):
        length = q.shape[2]
        if length not in self._layouts:
            n = -(-length // self.block)
            self._layouts[length] = BlockLayout.from_dense(
                torch.ones(n, n, dtype=torch.bool), q_len=length, k_len=length, block_q=self.block,
                block_k=self.block, causal=True, window=None if self.window is None else (self.window - 1, 0))
        return blockattn.attention(q, k, v, self._layouts[length].to(q.device), backend=self.backend)


def build_model(kind: str, *, vocab: int, window: int, dim: int = 64, heads: int = 2, block: int = 32,
                conv: int = 4, form: str = "linear", positions: int = 0, backend: str = "auto") -> TinyDecoder:
    if kind not in MODELS:
        raise ValueError(f"model kind must be one of {MODELS}, got {kind!r}")

    def mixer(layer):
        if kind == "dma":
            return DMAAttention(heads, dim // heads, window=window, form=form, block_size=block, backend=backend)
        return _LayoutMixer(window if kind == "window" else None, block, backend)
    return TinyDecoder(vocab, mixer, dim=dim, heads=heads, conv=conv, positions=positions)


@torch.no_grad()
def accuracy(model, inputs, labels, batch: int = 250) -> float:
    model.eval()
    correct = total = 0
    for at in range(0, len(inputs), batch):
        logits = model(inputs[at:at + batch])
        scored = labels[at:at + batch] != -100
        correct += int((logits.argmax(-1) == labels[at:at + batch])[scored].sum())
        total += int(scored.sum())
    model.train()
    return correct / total


@torch.no_grad()
def mask_recall(model, inputs, window: int, seed: int = 0) -> dict:
    """Mean over layers, heads and rows i >= window of the unmasked attention mass held by DMA's kept
    keys, by `window` random earlier keys, and by the last `window` keys. An evaluation at the
    experiment's small L: it builds the dense [L, L] probabilities on purpose."""
    captured = []
    handles = [b.mixer.register_forward_pre_hook(lambda mixer, args: captured.append((mixer, *args)))
               for b in model.blocks]
    model(inputs)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(seed)
    sums = {"dma": 0.0, "random": 0.0, "window": 0.0}
    count = 0
    for mixer, q, k, v in captured:
        bias = mixer.key_bias(v)
        length = q.shape[2]
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias.unsqueeze(-2)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)[..., window:, :]
        rows = torch.arange(window, length).view(-1, 1)
        cols = torch.arange(length).view(1, -1)
        tau = keep_thresholds(bias, window)[..., window:]
        dma = (cols <= rows) & (bias.unsqueeze(-2) >= tau.unsqueeze(-1))
        noise = torch.rand(probs.shape, generator=gen).masked_fill(cols > rows, -1.0)
        random = torch.zeros_like(dma).scatter_(-1, noise.topk(window, -1).indices, True)
        recent = (cols <= rows) & (cols > rows - window)
        for name, mask in (("dma", dma), ("random", random), ("window", recent)):
            sums[name] += float((probs * mask).sum(-1).mean())
        count += 1
    return {name: value / count for name, value in sums.items()}


@torch.no_grad()
def answer_recall(model, inputs, labels, num_kv_pairs: int) -> dict:
    """Why a DMA model misses a query: the answer sits at the value position of its pair (the only
    position whose causal conv saw the key next to the value), so the last layer must keep that key.
    Returns the share of scored queries whose value position the last layer keeps (in some head), the
    accuracy on those and on the rest, and the mean number of earlier "look-alike" positions: a
    value-range token right after a key-range token, which is what a query-independent bias computed
    from the value vectors alone can see (the filler draws such pairs at random)."""
    mixer = model.blocks[-1].mixer
    captured = []
    handle = mixer.register_forward_pre_hook(lambda m, args: captured.append(args[2]))
    logits = model(inputs)
    handle.remove()
    layout, _ = mixer.select(captured[0], model.blocks[-1].heads)
    kept = layout.to_token_mask().any(1).expand(len(inputs), -1, -1)  # [B, L, L]: kept by some head
    correct = logits.argmax(-1) == labels
    half = model.head.out_features // 2
    is_value, is_key = inputs >= half, (inputs > 0) & (inputs < half)
    lookalike = torch.zeros_like(is_value)
    lookalike[:, 1:] = is_value[:, 1:] & is_key[:, :-1]
    hit, miss, total, kept_queries, lookalikes = 0, 0, 0, 0, 0.0
    for b, i in (labels != -100).nonzero().tolist():
        where = (inputs[b, :2 * num_kv_pairs] == labels[b, i]).nonzero()
        if not len(where):
            continue
        j = int(where[0])
        total += 1
        lookalikes += float(lookalike[b, :i + 1].sum())
        if bool(kept[b, i, j]):
            kept_queries += 1
            hit += int(correct[b, i])
        else:
            miss += int(correct[b, i])
    return dict(kept=kept_queries / max(total, 1), accuracy_kept=hit / max(kept_queries, 1),
                accuracy_dropped=miss / max(total - kept_queries, 1), lookalikes=lookalikes / max(total, 1))


def train(kind: str, *, steps: int = 600, batch: int = 64, lr: float = 3e-3, seq_len: int = 64,
          num_kv_pairs: int = 4, vocab: int | None = None, window: int = 8, seed: int = 0, train_examples: int = 20000,
          test_examples: int = 1000, random_non_queries: bool = True, form: str = "linear",
          position_embeddings: bool = True, progress=None) -> dict:
    """Train one model on MQAR (AdamW, warm-up then cosine) and return its test accuracy and loss curve.
    `random_non_queries=False` leaves the filler positions at token 0 (Zoology's switch);
    `position_embeddings=False` gives the model RoPE and the conv only (the model of the earlier runs).
    `vocab` defaults to max(128, seq_len + 1): MQAR's vocabulary must exceed the length (Zoology: L + 1)."""
    vocab = max(128, seq_len + 1) if vocab is None else vocab
    inputs, labels = multiquery_ar(train_examples + test_examples, vocab_size=vocab, input_seq_len=seq_len,
                                   num_kv_pairs=num_kv_pairs, random_non_queries=random_non_queries, seed=seed)
    inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
    torch.manual_seed(seed)
    model = build_model(kind, vocab=vocab, window=window, form=form, positions=seq_len if position_embeddings else 0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    order = torch.randperm(train_examples, generator=torch.Generator().manual_seed(seed + 1))

    def next_batch(step):
        at = (step * batch) % (train_examples - batch + 1)
        idx = order[at:at + batch]
        return inputs[idx], labels[idx]

    losses, seconds = fit(model, optimiser, steps, next_batch, progress)
    test_in, test_lab = inputs[train_examples:], labels[train_examples:]
    result = dict(model=kind, accuracy=accuracy(model, test_in, test_lab), losses=losses, train_seconds=seconds,
                  steps=steps, batch=batch, lr=lr, seq_len=seq_len, window=window, num_kv_pairs=num_kv_pairs,
                  vocab=vocab, seed=seed, random_non_queries=random_non_queries, form=form,
                  position_embeddings=position_embeddings)
    if kind == "dma":
        result["mask_recall"] = mask_recall(model, test_in[:64], window, seed)
        result["answer_recall"] = answer_recall(model, test_in, test_lab, num_kv_pairs)
    return result

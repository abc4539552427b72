"""Landmark Attention trained here on a synthetic block-retrieval task (`blockattn train landmark`).

Task (the notes' CPU design): 16 blocks of 15 regular tokens + 1 landmark = 256 positions; six
(key, value) pairs sit in six distinct blocks among blocks 0-13 on filler drawn from a disjoint
vocabulary (by default in the block's last two regular slots, next to its landmark: with pairs at
random slots the tiny model had not left the loss plateau after 1000 steps here, see
docs/bench/trainable.md); the last block asks four of the keys, each followed by its value, and the model is scored
on predicting those values. Only the queried pair's block holds the answer, so attending the own
block alone is at chance (1/16). A 2-layer decoder (d_model 64, 2 heads, RoPE, a 4-wide causal
depthwise conv before each attention as in the project's MQAR model) trained with the grouped softmax over all blocks
is evaluated (A) with that full grouped softmax, (B) retrieving the top-k blocks per token and head
by landmark score (k = 1, 2; and k = 2 shared per query block), (C) with its own block only (k = 0).
The hit rate (per layer) is the share of queries whose pair block is the top-1 (top-2) landmark
choice of some head.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from blockattn.modules._tiny_lm import TinyDecoder, fit
from blockattn.modules.landmark import grouped_softmax_attention, insert_landmarks, landmark_retrieval

KEYS, VALUES, FILLER = range(0, 16), range(16, 32), range(32, 64)
LANDMARK, VOCAB = 64, 65


@dataclasses.dataclass
class LandmarkTask:
    blocks: int = 16
    block_size: int = 16  # 15 regular tokens + the landmark
    pairs: int = 6
    queries: int = 4
    pair_slot: str = "end"  # "end": a pair fills the block's last two regular slots; "random": anywhere

    def __post_init__(self):
        for name in ("blocks", "block_size", "pairs", "queries"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.pair_slot not in ("end", "random"):
            raise ValueError(f"pair_slot must be 'end' or 'random', got {self.pair_slot!r}")
        if self.blocks < 3 or self.pairs > self.blocks - 2 or self.queries > self.pairs or \
                2 * self.queries > self.block_size - 1 or self.block_size < 4:
            raise ValueError("LandmarkTask needs blocks >= 3, pairs <= blocks - 2, queries <= pairs and "
                             "2 * queries < block_size")

    @property
    def length(self) -> int:
        return self.blocks * self.block_size

    def sample(self, batch: int, generator: torch.Generator):
        """(stream [B, L] with landmarks, targets [B, L] with -100 off the scored positions,
        pair_block [B, L] = the block holding the answer at scored positions, -1 elsewhere)."""
        regular = self.block_size - 1
        grid = torch.randint(FILLER.start, FILLER.stop, (batch, self.blocks, regular), generator=generator)
        keys = torch.stack([torch.randperm(len(KEYS), generator=generator)[:self.pairs] for _ in range(batch)])
        values = torch.randint(VALUES.start, VALUES.stop, (batch, self.pairs), generator=generator)
        where = torch.stack([torch.randperm(self.blocks - 2, generator=generator)[:self.pairs] for _ in range(batch)])
        offset = torch.randint(0, regular - 1, (batch, self.pairs), generator=generator) \
            if self.pair_slot == "random" else torch.full((batch, self.pairs), regular - 2)
        rows = torch.arange(batch).view(-1, 1)
        grid[rows, where, offset] = keys
        grid[rows, where, offset + 1] = values
        asked = torch.stack([torch.randperm(self.pairs, generator=generator)[:self.queries] for _ in range(batch)])
        slots = torch.arange(self.queries) * 2
        grid[rows, -1, slots] = torch.gather(keys, 1, asked)
        grid[rows, -1, slots + 1] = torch.gather(values, 1, asked)
        stream = insert_landmarks(grid.flatten(1), block_size=self.block_size, landmark_id=LANDMARK)
        positions = (self.blocks - 1) * self.block_size + slots  # the asked keys; they predict the value
        targets = torch.full_like(stream, -100)
        targets[:, positions] = torch.gather(values, 1, asked)
        pair_block = torch.full_like(stream, -1)
        pair_block[:, positions] = torch.gather(where, 1, asked)
        return stream, targets, pair_block


class LandmarkMixer(nn.Module):
    """The grouped softmax over all blocks (`top_k=None`, training) or landmark retrieval of `top_k` blocks."""

    def __init__(self, block_size: int, backend: str = "auto"):
        super().__init__()
        self.block_size, self.backend = block_size, backend
        self.top_k: int | None = None
        self.aggregate = "per_token"
        self.last_blocks: Tensor | None = None

    def forward(self, q, k, v):
        if self.top_k is None:
            return grouped_softmax_attention(q, k, v, block_size=self.block_size, backend=self.backend)
        out, self.last_blocks = landmark_retrieval(q, k, v, block_size=self.block_size, top_k=self.top_k,
                                                   aggregate=self.aggregate, backend=self.backend,
                                                   return_blocks=True)
        return out


def build_model(task: LandmarkTask, *, dim: int = 64, heads: int = 2, layers: int = 2, conv: int = 4,
                backend: str = "auto"):
    return TinyDecoder(VOCAB, lambda layer: LandmarkMixer(task.block_size, backend), dim=dim, heads=heads,
                       layers=layers, conv=conv)


def _set_mode(model, top_k, aggregate="per_token"):
    for block in model.blocks:
        block.mixer.top_k, block.mixer.aggregate = top_k, aggregate


@torch.no_grad()
def evaluate(model, task: LandmarkTask, *, sequences: int, seed: int, batch: int = 100) -> dict:
    """Accuracy of the asked values in each attention mode, and the landmark hit rate."""
    gen = torch.Generator().manual_seed(seed)
    data = [task.sample(min(batch, sequences - at), gen) for at in range(0, sequences, batch)]
    n = task.blocks
    modes = {"full grouped softmax": (None, "per_token"), f"retrieve 2 of {n} (per token)": (2, "per_token"),
             f"retrieve 1 of {n} (per token)": (1, "per_token"),
             f"retrieve 2 of {n} (per query block)": (2, "max_over_tokens"), "own block only": (0, "per_token")}
    layers = len(model.blocks)
    results, hits, scored_total = {}, [[0, 0] for _ in range(layers)], 0
    model.eval()
    for label, (top_k, aggregate) in modes.items():
        _set_mode(model, top_k, aggregate)
        correct = total = 0
        for stream, targets, pair_block in data:
            logits = model(stream)
            scored = targets >= 0
            correct += int((logits.argmax(-1) == targets)[scored].sum())
            total += int(scored.sum())
            if top_k == 2 and aggregate == "per_token":
                truth = pair_block.unsqueeze(1)
                for layer, block in enumerate(model.blocks):
                    blocks = block.mixer.last_blocks  # [B, H, L, 2]
                    hits[layer][0] += int((blocks[..., 0] == truth).any(1)[scored].sum())
                    hits[layer][1] += int((blocks == truth.unsqueeze(-1)).any(-1).any(1)[scored].sum())
                scored_total += int(scored.sum())
        results[label] = correct / total
    _set_mode(model, None)
    model.train()
    return {"accuracy": results, "hit_top1": [h[0] / scored_total for h in hits],
            "hit_top2": [h[1] / scored_total for h in hits], "chance": 1 / len(VALUES)}


def train(*, steps: int = 1500, batch: int = 16, lr: float = 3e-3, seed: int = 0, eval_sequences: int = 1000,
          task: LandmarkTask | None = None, dim: int = 64, progress=None) -> dict:
    """Train with the grouped softmax (AdamW, betas (0.9, 0.95), wd 1e-3, warm-up then cosine) and evaluate."""
    task = task or LandmarkTask()
    torch.manual_seed(seed)
    model = build_model(task, dim=dim)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)

    def next_batch(step):
        stream, targets, _ = task.sample(batch, gen)
        return stream, targets

    losses, train_seconds = fit(model, optimiser, steps, next_batch, progress)
    result = evaluate(model, task, sequences=eval_sequences, seed=seed + 12345)
    result.update(losses=losses, train_seconds=train_seconds, steps=steps, batch=batch, lr=lr, seed=seed,
                  task=dataclasses.asdict(task))
    return result

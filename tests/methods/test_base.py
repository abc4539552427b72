"""BlockScorer's keep rules and layouts against plain loops, on a toy scorer (block-mean q . block-mean k)."""
import dataclasses

import pytest
import torch

from blockattn.methods.base import BlockScorer, BlockScores


@dataclasses.dataclass
class ToyScorer(BlockScorer):
    """Scores (query block, key block) by exp(mean q . mean k); causal: future blocks not allowed, the
    diagonal forced, block 0 always kept; per-token (block_q = 1) when `per_token`."""

    threshold: float = 0.7
    top_k: int = 2
    block: int = 8
    per_token: bool = False
    tile_size: int = 8

    def _score_blocks(self, q, k, *, causal):
        bq = 1 if self.per_token else self.block
        n_q, n_k = -(-q.shape[2] // bq), -(-k.shape[2] // self.block)
        pool = lambda x, b, n: torch.nn.functional.pad(x, (0, 0, 0, n * b - x.shape[2])).view(  # noqa: E731
            x.shape[0], x.shape[1], n, b, -1).mean(3)
        group = q.shape[1] // k.shape[1]
        keys = pool(k, self.block, n_k).repeat_interleave(group, 1)
        scores = (pool(q, bq, n_q) @ keys.transpose(-1, -2)).exp()
        rows = torch.arange(n_q).view(-1, 1) * bq // self.block   # each row's own key block
        cols = torch.arange(n_k).view(1, -1)
        allowed = cols <= rows if causal else None
        forced = cols == rows if causal else None
        return BlockScores(scores, bq, self.block, allowed=allowed, forced=forced, always=cols == 0)


def toy(rule, **params):
    """A ToyScorer keeping by `rule`."""
    return dataclasses.dataclass(type(f"Toy_{rule}", (ToyScorer,), {"keep_rule": rule}))(**params)


def naive_keep(scores, rule, value, allowed, forced, always):
    """Row by row: the rule as its docstring states it."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(scores.shape[0]):
        row = [(float(scores[r, j]) if allowed[r, j] else 0.0, j) for j in range(scores.shape[1])]
        if rule == "threshold":
            order = sorted(row, key=lambda x: (not forced[r, x[1]], -x[0], x[1]))
            total, mass = sum(s for s, _ in row), 0.0
            for s, j in order:
                if forced[r, j] or (mass < value * total and s > 0):
                    keep[r, j] = True
                mass += s
        elif rule == "top_k":
            order = sorted((x for x in row if allowed[r, x[1]]), key=lambda x: (not forced[r, x[1]], -x[0]))
            for _, j in order[:value]:
                keep[r, j] = True
        else:
            for s, j in row:
                keep[r, j] = bool(forced[r, j]) or (allowed[r, j] and s > value)
        keep[r] |= always[r]
    return keep


@pytest.mark.parametrize("rule,value", [("threshold", 0.7), ("threshold", 0.95), ("top_k", 2), ("top_k", 6),
                                        ("above", 1.2)])
@pytest.mark.parametrize("causal", [True, False])
def test_keep_rules_equal_loops(rule, value, causal):
    g = torch.Generator().manual_seed(len(rule) + int(value * 10))
    q, k = torch.randn(1, 4, 60, 8, generator=g), torch.randn(1, 2, 60, 8, generator=g)
    method = toy(rule, threshold=value, top_k=int(value))
    blocks = method._score_blocks(q, k, causal=causal)
    keep = method.keep_blocks(blocks, value)
    n_q, n_k = blocks.scores.shape[-2:]
    full = torch.ones(n_q, n_k, dtype=torch.bool)
    allowed = full if blocks.allowed is None else blocks.allowed
    forced = ~full if blocks.forced is None else blocks.forced
    for h in range(4):
        expected = naive_keep(blocks.scores[0, h], rule, value, allowed, forced, blocks.always.expand(n_q, n_k))
        assert torch.equal(keep[0, h], expected)
    # the layout lists exactly the kept blocks (causal: never one past the diagonal)
    layout = method.select(q, k, causal=causal) if causal else None
    if causal:
        assert torch.equal(layout.to_dense(), keep & torch.ones(n_q, n_k, dtype=torch.bool).tril())


def test_per_token_gates_become_row_masks():
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 44, 8, generator=g), torch.randn(2, 1, 44, 8, generator=g)
    method = toy("top_k", top_k=2, per_token=True, block=8, tile_size=8)
    gates = method.keep_blocks(method._score_blocks(q, k, causal=True), 2)      # [B, H, L, nBlocks]
    expected = gates.repeat_interleave(8, -1)[..., :44] & torch.ones(44, 44, dtype=torch.bool).tril()
    assert torch.equal(method.select(q, k, causal=True).to_token_mask(), expected)
    own = torch.arange(44) // 8
    assert gates[..., 0].all() and gates[..., torch.arange(44), own].all()   # always-kept and forced blocks
    assert (gates[..., 1:].sum(-1) <= 2).all()                               # top-2, block 0 outside the count


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="keep_rule"):
        toy("median").select(torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8), causal=True)

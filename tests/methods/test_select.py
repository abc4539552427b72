"""methods/_select.py's keep helpers against plain loops."""
import pytest
import torch

from blockattn.methods._select import cumulative_threshold, top_k


def naive_top_k(scores, k, allowed, forced):
    """Per row: forced blocks first (each counts toward k, allowed or not), then the best allowed rest."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(scores.shape[0]):
        budget = k - int(forced[r].sum())
        rest = sorted((j for j in range(scores.shape[1]) if allowed[r, j] and not forced[r, j]),
                      key=lambda j: -float(scores[r, j]))
        for j in rest[:max(budget, 0)]:
            keep[r, j] = True
        keep[r] |= forced[r] & allowed[r]
    return keep


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 9])
def test_top_k_equals_loop(k):
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(300, 12, generator=g)
    allowed = torch.rand(300, 12, generator=g) < 0.6
    forced = torch.rand(300, 12, generator=g) < 0.1
    forced[forced.sum(-1) > k] = False  # more forced blocks than k: which of them is kept is not defined
    assert torch.equal(top_k(scores, k, allowed=allowed, forced=forced), naive_top_k(scores, k, allowed, forced))
    assert torch.equal(top_k(scores, k, allowed=allowed), naive_top_k(scores, k, allowed, torch.zeros_like(forced)))


def test_cumulative_threshold_reaches_the_mass_with_the_fewest_blocks():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 10, generator=g) ** 3
    keep = cumulative_threshold(scores, 0.8)
    kept = (scores * keep).sum(-1)
    assert (kept >= 0.8 * scores.sum(-1) - 1e-6).all()
    # dropping the smallest kept block falls below the threshold
    smallest = torch.where(keep, scores, torch.inf).amin(-1)
    assert (kept - smallest < 0.8 * scores.sum(-1)).all()

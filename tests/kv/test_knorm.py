"""Key-norm: each KV head keeps its lowest-norm keys, in position order."""
import pytest
import torch

pytest.importorskip("transformers")

from blockattn import kv  # noqa: E402


def test_keeps_the_smallest_key_norms_per_head():
    k = torch.randn(2, 3, 40, 8)
    chosen = kv.get("knorm", ratio=0.75).select(0, torch.randn(2, 6, 40, 8), k, k, 8 ** -0.5)
    for h, index in enumerate(chosen.keep):
        for b in range(2):
            norms = [float(k[b, h, j].norm()) for j in range(40)]
            expected = sorted(sorted(range(40), key=lambda j: norms[j])[:10])
            assert index[b].tolist() == expected

"""StreamingLLM: sinks + recent window inside the budget, and the bounded cache while decoding."""
import pytest
import torch

pytest.importorskip("transformers")

from blockattn import kv  # noqa: E402
from tests.kv.common import VOCAB, decode, tiny_llama  # noqa: E402


def naive_keep(n, sink, kept):
    return sorted(set(range(sink)) | set(range(n - (kept - sink), n)))


def test_select_is_sinks_plus_recent_window():
    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 2, 50, 8)
    for ratio, sink in [(0.5, 4), (0.3, 0), (0.9, 2)]:
        chosen = kv.get("streaming", ratio=ratio, sink=sink).select(0, q, k, k, 8 ** -0.5)
        kept = int(50 * (1 - ratio))
        for index in chosen.keep:
            assert index.shape == (2, kept) and index[1].tolist() == naive_keep(50, sink, kept)
        assert chosen.capacity == [kept, kept]


def test_decoding_keeps_the_cache_bounded():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 60))
    _, _, _, cache = decode(model, ids, 7, "streaming:ratio=0.5,sink=2")
    for layer in cache.layers:
        for p in layer.positions:
            assert p[0].tolist() == naive_keep(67, 2, 30)


def test_window_without_ratio_is_a_fixed_size_cache():
    model = tiny_llama()
    _, _, _, cache = decode(model, torch.randint(0, VOCAB, (1, 80)), 3, "streaming:sink=4,window=16")
    assert cache.lengths() == [[20, 20], [20, 20]]

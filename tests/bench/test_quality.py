"""The quality report against direct float64 computations on small inputs."""
import torch

import blockattn
from blockattn.bench.quality import attention_recall, format_table, measure


def test_recall_equals_dense_mass_inside_the_mask():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 16, generator=g), torch.randn(1, 2, 300, 16, generator=g)
    layout = blockattn.patterns.random_blocks(300, density=0.4, heads=4, block_q=32, block_k=32)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 4
    scores = scores.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf"))
    expected = (torch.softmax(scores, -1) * layout.to_token_mask()).sum(-1).mean()
    assert abs(attention_recall(q, k, layout) - float(expected)) < 1e-5
    assert abs(attention_recall(q, k, blockattn.patterns.causal(300, block_q=32, block_k=32)) - 1.0) < 1e-5


def test_measure_dense_layout_is_exact_and_table_prints():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    full = measure("xattention", q, k, v, repeats=1)
    assert 0 < full.density <= 1 and 0 < full.recall <= 1 + 1e-6 and full.output_error >= 0
    loose = measure(blockattn.methods.get("xattention", threshold=0.3, block_size=32), q, k, v, repeats=1)
    assert loose.density < 1 and loose.recall < 1 and loose.output_error > 0
    assert "| xattention | 256 |" in format_table([full, loose])


def test_skip_reason_names_missing_context_only():
    from blockattn.bench.quality import skip_reason
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
    assert "grid" in skip_reason("vmoba", q, k)
    assert skip_reason("xattention", q, k) is None


def test_per_layer_methods_get_each_captured_layer():
    # a method calibrated per model layer (seer gates, vertical_slash:config=) refuses select() without
    # `layer=`: the eval's layer-quality columns and compare's skip check must pass the captured layer
    from blockattn.bench.metrics import layer_quality
    from blockattn.bench.quality import skip_reason

    class PerLayer(blockattn.methods.get("streaming").__class__):
        seen = []

        def _select(self, q, k, *, causal, grid, layer):
            if layer is None:
                raise ValueError("layer is required: this method is calibrated per layer")
            PerLayer.seen.append(layer)
            return super()._select(q, k, causal=causal, grid=grid, layer=layer)

    g = torch.Generator().manual_seed(2)
    captured = {layer: tuple(torch.randn(1, 2, 256, 16, generator=g) for _ in range(3)) for layer in (3, 7)}
    method = PerLayer()
    assert skip_reason(method, *captured[3][:2], layer=3) is None
    assert "layer is required" in skip_reason(method, *captured[3][:2])
    result = layer_quality(method, captured)
    assert set(result["per_layer_recall"]) == {3, 7} and {3, 7} <= set(PerLayer.seen)

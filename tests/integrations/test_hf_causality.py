"""A patched causal LM never sees the future: for every method that serves causal models,
`hf.patch(smollm2, name)` with its paper defaults, changing the tokens after position t leaves the
logits at positions <= t unchanged; methods that cannot serve a causal LM are refused before any work.
The model is SmolLM2-135M cut to its first 2 layers (a leak in any layer reaches the logits; 2 keep
the 14 methods x 896 tokens affordable in CI).

t sits on a boundary of every method's blocks (512: MoBA's block, 4 x XAttention's, BiFormer's 7
regions of 128 on 896 tokens), since block-granular selectors (xattention, hip, sale, biformer, paro)
let the later tokens of a query block change the earlier tokens' key sets, as their official code
does; vertical_slash's defaults keep every diagonal below 6096 tokens.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, methods  # noqa: E402

LENGTH, CUT, LAYERS = 896, 512, 2


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from blockattn import models
    try:
        model, _ = models.load("smollm2-135m")
    except ImportError as error:
        pytest.skip(str(error))
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    return model


@pytest.fixture(scope="module")
def prompts(smollm2):
    g = torch.Generator().manual_seed(0)
    vocab = smollm2.config.vocab_size
    ids = torch.randint(0, vocab, (1, LENGTH), generator=g)
    changed = ids.clone()
    changed[:, CUT:] = torch.randint(0, vocab, (1, LENGTH - CUT), generator=g)
    return torch.cat([ids, changed])  # one batch of 2: the same forward runs both


def causal_lm_methods():
    out = []
    for name in methods.training_free():
        method = methods.get(name)
        if True in method.causal_modes and not method.needs_grid:
            out.append(name)
    return out


@pytest.mark.parametrize("name", causal_lm_methods())
def test_later_tokens_do_not_change_earlier_logits(smollm2, prompts, name):
    with torch.no_grad(), hf.patch(smollm2, name) as handle:
        logits = smollm2(prompts, use_cache=False).logits
    assert handle.stats.prefill_calls == LAYERS
    before = logits[:, :CUT]
    scale = before[0].norm()
    assert (before[1] - before[0]).norm() / scale < 1e-5, name
    assert (logits[1, CUT:] - logits[0, CUT:]).norm() / logits[0, CUT:].norm() > 1e-2  # the change is real


def test_methods_that_cannot_serve_a_causal_lm_are_refused_before_any_work(smollm2):
    refused = [name for name in methods.training_free() if name not in causal_lm_methods()]
    assert refused  # vmoba: grid-only, encoder-only
    for name in refused:
        with pytest.raises(ValueError, match="grid|encoder-only"):
            hf.patch(smollm2, name)
        assert smollm2.config._attn_implementation != hf.NAME


def test_a_future_seeing_layout_is_refused(smollm2, prompts):
    class Peek(methods.Method):
        """Every query sees every key: non-causal, whatever it is asked."""
        name = "peek"

        def _select(self, q, k, *, causal, grid, layer):
            from blockattn import patterns
            return patterns.full(q.shape[2], k.shape[2])

    with torch.no_grad(), hf.patch(smollm2, Peek()), pytest.raises(ValueError, match="later key"):
        smollm2(prompts[:, :128], use_cache=False)

"""blockattn.kv on hybrid models (Gemma 3: sliding and full layers): sliding layers keep only their window,
the policy acts on the full layers; tokens, positions, logits against a float64 masked oracle, real bytes."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, kv  # noqa: E402
from tests.integrations.test_hf import tiny_gemma3  # noqa: E402
from tests.kv.common import decode, rel, tiny_llama  # noqa: E402

WINDOW = 48


def _kinds(obj):  # a model or an attention module
    return obj.config.layer_types


@pytest.mark.parametrize("spec", [{"full_attention": None}, "knorm", {"full_attention": "streaming",
                                                                      "sliding_attention": None}])
def test_keep_everything_generates_the_same_tokens_past_the_window(spec):
    model = tiny_gemma3(window=WINDOW)  # eager, with transformers' own sliding cache: the reference
    ids = torch.randint(1, 97, (1, 70))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=40, do_sample=False)   # 110 tokens: past two windows
        with hf.patch(model, kv=spec):
            out = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    cache = out.past_key_values
    assert isinstance(cache, kv.KVCache) and cache.get_seq_length() == 70 + 39
    for kind, layer in zip(_kinds(model), cache.layers):
        held = WINDOW - 1 if kind == "sliding_attention" else 109
        assert layer.lengths() == [held]
        # the kept tokens keep their true positions: the last `held` ones
        assert layer.positions[0][0].tolist() == list(range(109 - held, 109))


class _Oracle:
    """float64 eager twin: a sliding layer's rows see `q - window < k <= q`; a full layer's prompt rows are
    causal and decode row t sees exactly `attended[t][layer][0]` (one KV head)."""

    NAME = "blockattn_kv_hybrid_oracle"

    def __init__(self, model):
        transformers.AttentionInterface.register(self.NAME, self.forward)
        self.model = transformers.Gemma3ForCausalLM(model.config).eval().double()
        self.model.load_state_dict(model.state_dict())
        self.model.set_attn_implementation(self.NAME)

    def logits(self, ids, fed, attended):
        self.prompt, self.attended = ids.shape[1], attended
        with torch.no_grad():
            return self.model(torch.cat([ids, torch.tensor([fed])], dim=1)).logits[0, self.prompt:]

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        length = query.shape[2]
        i, j = torch.arange(length)[:, None], torch.arange(length)[None]
        allowed = j <= i
        if _kinds(module)[module.layer_idx] == "sliding_attention":
            allowed &= j > i - module.config.sliding_window
        else:
            for t, row in enumerate(range(self.prompt, length)):
                allowed[row] = False
                allowed[row, self.attended[t][module.layer_idx][0]] = True
        logits = (query[0] @ key[0].transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
        return (logits.softmax(-1) @ value[0]).unsqueeze(0).transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("spec", ["snapkv:ratio=0.7,window_size=8", "streaming:ratio=0.6,sink=3"])
def test_compressed_full_layers_positions_and_logits_equal_masked_float64_oracle(spec):
    model = tiny_gemma3(window=WINDOW)
    n, steps = 100, 6
    ids = torch.randint(1, 97, (1, n))
    positions = []
    hook = model.model.rotary_emb.register_forward_hook(lambda m, args, out: positions.append(args[1].flatten()))
    logits, fed, attended, cache = decode(model, ids, steps, spec)
    hook.remove()
    # new tokens continue from the true position (100), not from a shrunken cache length; one rotary call per
    # layer type and step
    assert [p.tolist() for p in positions[2:]] == [[n + t] for t in range(steps) for _ in range(2)]
    full = _kinds(model).index("full_attention")
    assert cache.layers[full].lengths()[0] < n   # the policy really compressed the full layer
    for kind, layer in zip(_kinds(model), cache.layers):
        p = layer.positions[0][0]
        assert p[-1] == n + steps - 1 and bool((p[1:] > p[:-1]).all())
        if kind == "sliding_attention":
            assert p.tolist() == list(range(n + steps - WINDOW, n + steps))[1:]
    expected = _Oracle(model).logits(ids, fed, attended)
    assert rel(logits, expected) < 1e-5
    dense, *_ = decode(model, ids, steps, {"full_attention": None}, greedy_from=fed)
    assert rel(dense, expected) > 1e-4   # the compression really changed what decoding sees


def test_cache_bytes_sliding_layers_hold_their_window_only():
    model = tiny_gemma3(window=WINDOW)
    n = 200
    ids = torch.randint(1, 97, (1, n))
    token = 2 * 16 * 4       # K and V, head_dim 16, fp32, one KV head
    position = 4             # the int32 position of each kept token
    sliding = _kinds(model).count("sliding_attention")
    with torch.no_grad():
        with hf.patch(model, kv={"full_attention": None}):
            bounded = kv.cache_bytes(model(ids, use_cache=True).past_key_values)
        with hf.patch(model, kv="knorm:ratio=0.7"):
            cache = model(ids, use_cache=True).past_key_values
    assert bounded == (sliding * (WINDOW - 1) + n) * (token + position)
    kept = int(n * 0.3)
    assert cache.lengths() == [[WINDOW - 1] if k == "sliding_attention" else [kept] for k in _kinds(model)]
    assert kv.cache_bytes(cache) == (sliding * (WINDOW - 1) + kept) * (token + position)
    dense = len(_kinds(model)) * n * token   # every layer holding every token
    assert kv.cache_bytes(cache) < 0.3 * dense


def test_per_layer_type_spec_errors_and_plain_models():
    model = tiny_gemma3()
    with pytest.raises(ValueError, match="sliding_attention.*must be None"):
        hf.patch(model, kv={"sliding_attention": "knorm"})
    with pytest.raises(ValueError, match="full_attention"):
        hf.patch(model, kv={"global": None})
    with pytest.raises(ValueError, match="known policies"):
        hf.patch(model, kv={"full_attention": "nope"})
    with hf.patch(model, kv="knorm"):   # what a policy's setup may read: the layers it acts on
        assert model.model.layers[0].self_attn._blockattn_kv.policy_layers == [2]
    # a model without sliding layers: the dict's full_attention policy is the policy
    llama = tiny_llama()
    ids = torch.randint(0, 97, (1, 60))
    with torch.no_grad(), hf.patch(llama, kv={"full_attention": "knorm:ratio=0.5"}):
        assert llama(ids, use_cache=True).past_key_values.lengths() == [[30, 30]] * 2


def test_chunked_prefill_after_the_first_call_equals_unpatched_logits():
    # a later chunk longer than decode_max_q goes through the band on the 47 + 40 kept/new tokens
    model = tiny_gemma3(window=WINDOW)
    ids = torch.randint(1, 97, (1, 140))
    with torch.no_grad():
        ref = model(ids).logits[0, 100:]
        with hf.patch(model, kv={"full_attention": None}):
            cache = model(ids[:, :100], use_cache=True).past_key_values
            out = model(ids[:, 100:], past_key_values=cache, use_cache=True).logits[0]
    assert cache.get_seq_length() == 140 and cache.lengths()[0] == [WINDOW - 1]
    assert rel(out, ref) < 1e-5


def _naive_razor_budget(types, retrieval, ratio, n, kv_heads=1):
    """RazorAttention's ratio budget written out: counted over the full layers' KV heads only; returns the
    tokens (sinks + window, not the compensation slot) each full layer's head keeps."""
    governed = [i for i, t in enumerate(types) if t == "full_attention"]
    total = len(governed) * kv_heads
    full = len([h for h in retrieval if h[0] in governed])
    per_head = int(((1 - ratio) * total * n - full * n) / (total - full))
    return {(layer, h): n if (layer, h) in retrieval else per_head - 1 for layer in governed for h in range(kv_heads)}


@pytest.mark.parametrize("types, params", [
    (("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"), {"ratio": 0.7}),
    # a retrieval head named in a sliding layer governs nothing there and takes no budget
    (("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
     {"ratio": 0.7, "retrieval_heads": [(0, 0)]}),
    # two full layers, one probe-chosen retrieval head among them (round(0.5 * 2) = 1)
    (("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
     {"ratio": 0.4, "induction_ratio": 0.5, "echo_ratio": 0.0})])
def test_razor_budget_counts_only_the_full_layers(types, params):
    import warnings
    model = tiny_gemma3(window=WINDOW, types=types)
    n, ratio = 200, params["ratio"]
    policy = kv.get("razor", probe_period=12, **params)
    ids = torch.randint(1, 97, (1, n))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")   # it does compress: no "nothing is compressed" warning
        with hf.patch(model, kv=policy):
            cache = model(ids, use_cache=True).past_key_values
    governed = [i for i, t in enumerate(types) if t == "full_attention"]
    assert policy.governed == governed and policy.note is None
    retrieval = set(policy.retrieval_heads)
    if policy.scores is not None:   # the probe's heads: the top scores among the full layers' heads only
        chosen = set()
        for scores, fraction in zip(policy.scores[::-1], (policy.induction_ratio, policy.echo_ratio)):
            ranked = sorted(governed, key=lambda layer: -float(scores[layer, 0]))
            chosen |= {(layer, 0) for layer in ranked[:round(fraction * len(governed))]}
        assert retrieval == chosen and len(chosen) == 1
    elif "retrieval_heads" not in params:   # 14 % and 1 % of one head round to none: no probe is run
        assert retrieval == set() and len(governed) == 1
    expected = _naive_razor_budget(types, retrieval, ratio, n)
    for layer, kind in enumerate(types):
        held = cache.layers[layer].lengths()
        assert held == ([WINDOW - 1] if kind == "sliding_attention" else [expected[(layer, 0)]]), (layer, held)
    token, position = 2 * 16 * 4, 4   # K and V (head_dim 16, fp32, one KV head); an int32 position
    full_bytes = sum(cache.layers[layer].nbytes() for layer in governed)
    dense_full = len(governed) * n * token
    overhead = len(governed) * (token + 4) + sum(expected.values()) * position   # comp slot + count, positions
    assert full_bytes <= (1 - ratio) * dense_full * 1.05 + overhead
    assert full_bytes >= (1 - ratio) * dense_full * 0.9   # and it is not over-compressed either


@pytest.mark.parametrize("params", [{"retrieval_heads": [(2, 0)]}, {"induction_ratio": 1.0}])
def test_razor_says_plainly_when_every_full_head_is_retrieval(params):
    model = tiny_gemma3(window=WINDOW)
    policy = kv.get("razor", ratio=0.7, probe_period=12, **params)
    ids = torch.randint(1, 97, (1, 120))
    with torch.no_grad(), pytest.warns(UserWarning, match="every governed KV head.*nothing is compressed.*0.7"):
        with hf.patch(model, kv=policy):
            cache = model(ids, use_cache=True).past_key_values
    assert policy.retrieval_heads == [(2, 0)]   # the probe chose among the full layer's heads only
    assert "1 of 1" in policy.note and "[2]" in policy.note
    assert cache.lengths() == [[WINDOW - 1], [WINDOW - 1], [120], [WINDOW - 1]]

"""ACT: the column score, the sink set (first sink exempt) and the row recalibration, against a float64
twin of the official code form on a tiny model (prefill and decode)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from blockattn import hf, kv  # noqa: E402
from blockattn.kv import act  # noqa: E402
from tests.kv.common import VOCAB, decode, rel, tiny_llama  # noqa: E402


def naive_calibrated(attn, prompt, tau, beta):
    """attn [L, L] float64 causal probabilities -> (sinks, A') per the official code form."""
    n = prompt
    a = torch.tensor([float(attn[j:n, j].sum()) / (n - j) for j in range(n)])
    sinks = [j for j in range(n) if a[j] > tau][1:]
    fixed = attn.clone()
    if sinks:
        in_s = torch.zeros(attn.shape[1], dtype=torch.bool)
        in_s[sinks] = True
        for i in range(attn.shape[0]):
            m = float(attn[i, in_s].sum())
            rest = float(attn[i, ~in_s].sum())
            fixed[i, in_s] = beta * attn[i, in_s]
            fixed[i, ~in_s] = attn[i, ~in_s] + (1 - beta) * m * attn[i, ~in_s] / rest
    return sinks, fixed


class ActTwin:
    NAME = "blockattn_kv_test_act"

    def __init__(self, model, heads, tau, beta):
        transformers.AttentionInterface.register(self.NAME, self.forward)
        self.model = transformers.LlamaForCausalLM(model.config).eval().double()
        self.model.load_state_dict(model.state_dict())
        self.model.set_attn_implementation(self.NAME)
        self.heads, self.tau, self.beta, self.sinks = heads, tau, beta, {}

    def logits(self, ids, fed):
        self.prompt = ids.shape[1]
        with torch.no_grad():
            return self.model(torch.cat([ids, torch.tensor([fed])], 1)).logits[0]

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, length = module.layer_idx, query.shape[2]
        group = query.shape[1] // key.shape[1]
        out = torch.zeros_like(query)
        for h in range(query.shape[1]):
            logits = query[0, h] @ key[0, h // group].T * scaling
            attn = logits.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            if (layer, h) in self.heads:
                self.sinks[layer, h], attn = naive_calibrated(attn, self.prompt, self.tau, self.beta)
            out[0, h] = attn @ value[0, h // group]
        return out.transpose(1, 2).contiguous(), None


def test_prefill_and_decode_match_the_code_form():
    model = tiny_llama(layers=5, heads=4, kv_heads=2)
    n = 60
    ids = torch.randint(0, VOCAB, (1, n))
    tau = 1.3 / n
    policy = kv.get("act", beta=0.4, tau=tau)
    with torch.no_grad(), hf.patch(model, kv=policy):
        prefill = model(ids, use_cache=True).logits[0]
    logits, fed, _, _ = decode(model, ids, 4, policy)
    heads = {(layer, h) for layer in (2, 3) for h in range(4)}     # layers 2 … L − 2
    twin = ActTwin(model, heads, tau, 0.4)
    expected = twin.logits(ids, fed)
    assert sum(len(s) for s in twin.sinks.values()) > 0
    for (layer, h), sinks in twin.sinks.items():
        assert policy.sinks_found[layer][0][h].tolist() == sinks
    assert rel(prefill, expected[:n]) < 1e-5
    assert rel(logits, expected[n:]) < 1e-5
    plain, *_ = decode(model, ids, 4, "knorm", greedy_from=fed)
    assert rel(plain, expected[n:]) > 1e-5


def test_beta_one_is_the_identity_and_rows_stay_normalised():
    q, k, v = torch.randn(30, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64), \
        torch.eye(30, 8, dtype=torch.float64)
    attn = (q @ k.T / 8 ** 0.5).masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), float("-inf"))
    lse = attn.logsumexp(-1)
    out = attn.softmax(-1) @ v
    sinks = torch.tensor([0, 3, 5])
    assert torch.allclose(act.calibrate(out, lse, q, k, v, sinks, 8 ** -0.5, 1.0), out, atol=1e-12)
    ones = torch.ones(30, 1, dtype=torch.float64)
    mixed = act.calibrate(attn.softmax(-1) @ ones, lse, q, k, ones, sinks, 8 ** -0.5, 0.4)
    assert torch.allclose(mixed, ones, atol=1e-12)

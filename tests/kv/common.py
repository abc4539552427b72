"""Shared by the kv tests: a tiny random Llama and a float64 oracle that re-creates, with explicit masks,
what a compressed cache lets each decode step see."""
import math

import torch
import transformers

from blockattn import hf

VOCAB = 97


def tiny_llama(layers=2, heads=4, kv_heads=2, hidden=64, max_pos=1024, seed=0):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def decode(model, ids, steps, spec, *, greedy_from=None):
    """Prefill `ids` with `spec` as kv policy, then feed `steps` tokens one at a time. Returns the logits of
    every fed token `[steps, V]`, the tokens fed, the positions each step attended ([step][layer][head]),
    and the cache. The fed tokens are the greedy continuation (or `greedy_from`, a fixed list)."""
    n = ids.shape[1]
    logits, fed, attended = [], [], []
    with torch.no_grad(), hf.patch(model, kv=spec):
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for t in range(steps):
            if greedy_from is not None:
                token = torch.tensor([[greedy_from[t]]])
            before = [[p[0].tolist() + [n + t] for p in layer.positions] for layer in cache.layers]
            attended.append(before)
            fed.append(int(token))
            out = model(token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits), fed, attended, cache


class Oracle:
    """float64 eager twin of `model`: the prompt rows attend causally; decode row t of layer l, KV head h,
    sees exactly `attended[t][l][h]`, plus (RazorAttention) one slot holding the mean key/value of the
    prompt tokens listed in `compensated[l][h]`, with logit + log N_d."""

    NAME = "blockattn_kv_test_oracle"

    def __init__(self, model):
        transformers.AttentionInterface.register(self.NAME, self.forward)
        self.model = transformers.LlamaForCausalLM(model.config).eval().double()
        self.model.load_state_dict(model.state_dict())
        self.model.set_attn_implementation(self.NAME)
        self.prompt, self.attended, self.compensated = 0, [], None

    def logits(self, ids, fed, attended, compensated=None):
        self.prompt, self.attended, self.compensated = ids.shape[1], attended, compensated
        full = torch.cat([ids, torch.tensor([fed])], dim=1)
        with torch.no_grad():
            return self.model(full).logits[0, self.prompt:]

    def forward(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer, n = module.layer_idx, self.prompt
        length, group = query.shape[2], query.shape[1] // key.shape[1]
        out = torch.zeros_like(query)
        for h in range(query.shape[1]):
            kv = h // group
            q, k, v = query[0, h], key[0, kv], value[0, kv]
            logits = q @ k.T * scaling
            allowed = torch.ones(length, length, dtype=torch.bool).tril()
            for t, row in enumerate(range(n, length)):
                allowed[row] = False
                allowed[row, self.attended[t][layer][kv]] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
            extra_logit, extra_value = None, None
            dropped = self.compensated[layer][kv] if self.compensated else None
            if dropped:
                k_hat, v_hat = k[dropped].mean(0), v[dropped].mean(0)
                extra_logit = q @ k_hat * scaling + math.log(len(dropped))
                extra_logit[:n] = float("-inf")
                extra_value = v_hat
            if extra_logit is None:
                out[0, h] = logits.softmax(-1) @ v
            else:
                both = torch.cat([logits, extra_logit[:, None]], dim=1).softmax(-1)
                out[0, h] = both[:, :-1] @ v + both[:, -1:] * extra_value
        return out.transpose(1, 2).contiguous(), None


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())

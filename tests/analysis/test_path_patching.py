"""Path patching against the plain definition (Wang et al. 2022) on a tiny random Llama: every attention head
frozen at every position through o_proj pre-hooks, the sender's slice taken from the corrupted run, queries
replaced through a q_proj forward hook."""
import pytest
import torch

from blockattn.analysis import circuits, path_patching

from .tiny_lm import WordTokenizer, o_proj_io
from .tiny_lm import tiny_llama as _tiny_llama


LAYERS, HEADS, DIM = 3, 4, 8


def tiny_llama():
    # larger weights than the init, so that every path has a visible effect
    return _tiny_llama(layers=LAYERS, heads=HEADS, weight_scale=4.0)


def pairs(n=6):
    prompts, _, abc = circuits.ioi_dataset(n, seed=1)
    return prompts, abc


def o_proj_inputs(model, ids):
    return {layer: inputs for layer, (inputs, _) in o_proj_io(model, ids).items()}


def frozen_run(model, ids, clean_in, corrupt_in, sender, record_q=()):
    """Logits (and the q_proj outputs of layers `record_q`) with every head's o_proj input frozen to the
    clean run at every position, except the sender's slice from the corrupted run."""
    s, h = sender
    qs = {}

    def pre(i):
        def f(module, args):
            x = clean_in[i].clone()
            if i == s:
                x[..., h * DIM:(h + 1) * DIM] = corrupt_in[i][..., h * DIM:(h + 1) * DIM]
            return (x,)
        return f
    handles = [blk.self_attn.o_proj.register_forward_pre_hook(pre(i)) for i, blk in enumerate(model.model.layers)]
    handles += [model.model.layers[l].self_attn.q_proj.register_forward_hook(
        lambda m, a, o, l=l: qs.__setitem__(l, o.clone())) for l in record_q]
    try:
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    return logits, qs


def query_patched(model, ids, new_q, receivers):
    """Clean logits with the receivers' queries at the last position replaced by `new_q[layer]`."""
    def hook(l):
        def f(module, args, out):
            out = out.clone()
            for layer, head in receivers:
                if layer == l:
                    out[:, -1, head * DIM:(head + 1) * DIM] = new_q[l][:, -1, head * DIM:(head + 1) * DIM]
            return out
        return f
    handles = [model.model.layers[l].self_attn.q_proj.register_forward_hook(hook(l)) for l in {r[0] for r in receivers}]
    try:
        with torch.no_grad():
            return model(ids).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()


def diff(logits, tok, p):
    return float(logits[circuits.word_id(tok, p.answer)] - logits[circuits.word_id(tok, p.foil)])


def naive_scores(model, tok, clean, corrupt, receivers=None):
    base, worst, patched = [], [], torch.zeros(LAYERS, HEADS)
    ins = []
    for p, c in zip(clean, corrupt):
        ids, cids = torch.tensor([tok(p.text).input_ids]), torch.tensor([tok(c.text).input_ids])
        with torch.no_grad():
            base.append(diff(model(ids).logits[0, -1], tok, p))
            worst.append(diff(model(cids).logits[0, -1], tok, p))
        ins.append((ids, o_proj_inputs(model, ids), o_proj_inputs(model, cids)))
    for s in range(LAYERS):
        for h in range(HEADS):
            total = 0.0
            for p, (ids, clean_in, corrupt_in) in zip(clean, ins):
                if receivers is None:
                    logits, _ = frozen_run(model, ids, clean_in, corrupt_in, (s, h))
                else:
                    _, qs = frozen_run(model, ids, clean_in, corrupt_in, (s, h), record_q={r[0] for r in receivers})
                    logits = query_patched(model, ids, qs, receivers)
                total += diff(logits, tok, p)
            patched[s, h] = total / len(clean)
    b, w = sum(base) / len(base), sum(worst) / len(worst)
    return (patched - b) / (b - w)


def test_heads_to_logits_equals_the_plain_definition():
    model, tok = tiny_llama(), WordTokenizer()
    clean, corrupt = pairs()
    got = path_patching.heads_to_logits(model, tok, clean, corrupt)
    want = naive_scores(model, tok, clean, corrupt)
    assert got.shape == (LAYERS, HEADS) and float(want.abs().max()) > 1e-2
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_heads_to_queries_equals_the_plain_definition():
    model, tok = tiny_llama(), WordTokenizer()
    clean, corrupt = pairs()
    receivers = [(2, 1), (2, 3), (1, 0)]
    got = path_patching.heads_to_queries(model, tok, clean, corrupt, receivers, chunk=5)  # several chunks
    want = naive_scores(model, tok, clean, corrupt, receivers)
    want[2] = 0  # heads in the last receiver layer reach no receiver
    assert float(want[:2].abs().max()) > 1e-3
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


def test_bad_input_and_top_heads():
    model, tok = tiny_llama(), WordTokenizer()
    clean, corrupt = pairs(3)
    with pytest.raises(ValueError, match="align"):
        bad = [corrupt[0]._replace(text=corrupt[0].text + " extra")] + list(corrupt[1:])
        path_patching.heads_to_logits(model, tok, clean, bad)
    with pytest.raises(ValueError, match="pair up"):
        path_patching.heads_to_logits(model, tok, clean, corrupt[:2])
    with pytest.raises(TypeError, match="lists"):
        path_patching.heads_to_logits(model, tok, "a", corrupt)
    with pytest.raises(ValueError, match="receiver"):
        path_patching.heads_to_queries(model, tok, clean, corrupt, [(5, 0)])
    scores = torch.tensor([[0.1, -0.5], [-0.9, 0.3]])
    assert path_patching.top_heads(scores, 0.5) == [(1, 0), (0, 1)]
    assert path_patching.top_heads(scores, 0.25, sign=1) == [(1, 1)]
    assert path_patching.ranking(scores).order == [(1, 0), (0, 1), (0, 0), (1, 1)]


def test_staged_circuit_is_the_union_of_each_stage_top_by_magnitude():
    model, tok = tiny_llama(), WordTokenizer()
    clean, corrupt = pairs(4)
    c = path_patching.staged_circuit(model, tok, clean, corrupt, fraction=0.2)  # 2 of 12 heads per stage
    assert c["movers"] == path_patching.top_heads(c["logits"], 0.2)
    want = path_patching.heads_to_queries(model, tok, clean, corrupt, c["movers"])
    torch.testing.assert_close(c["queries"], want)
    top_abs = [path_patching.ranking(s.abs(), sign=1).order[:2] for s in (c["logits"], c["queries"])]
    assert set(c["circuit"]) == set(top_abs[0]) | set(top_abs[1])
    assert c["combined"].order[0] == path_patching.ranking(torch.minimum(c["logits"], c["queries"])).order[0]

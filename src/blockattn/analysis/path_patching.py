"""Path patching (Wang, Variengien, Conmy, Shlegeris, Steinhardt, "Interpretability in the Wild: a Circuit
for Indirect Object Identification in GPT-2 small", arXiv 2211.00593, section 3 and appendix B; the method
Merullo et al. 2024 use to find the IOI and Colored Objects circuits).

The rule. A clean prompt x_orig and its corrupted twin x_new (token for token aligned, e.g. Wang et al.'s
ABC: same sentence, three fresh names) are run and every head's output cached. For a sender head h:
- h -> logits: rerun x_orig with h's output taken from x_new and every other attention head frozen to its
  x_orig output (MLPs and norms recompute), and read the logit difference answer - foil.
- h -> receivers' queries: in that same frozen run, compute the receiver heads' queries; then rerun x_orig
  with only those queries replaced (everything else recomputes freely) and read the logit difference.
The score is (LD_patched - LD_orig) / (LD_orig - LD_new): 0 = no effect, -1 = as much as corrupting the
whole prompt (ARENA's normalisation of Wang et al.'s measure).

Why it is cheap here: with every head frozen, positions exchange nothing, so the frozen run of the last
(END) position is its own residual stream: embedding + the frozen heads' o_proj outputs + MLPs recomputed
at END only, one vector per (sender, prompt). Only the sender's END output matters, and receivers' queries
are replaced at END (the position the logit reads; Wang et al. patch the Name Movers' queries at END), so
the free rerun is one decoding step over the clean prefix's KV cache. The tests check both against the
plain definition (all positions frozen / patched through ordinary module hooks).

Supported: Llama-style decoder layers (input_layernorm, self_attn.{q,o}_proj, post_attention_layernorm,
mlp; final norm; lm_head) as in SmolLM2; the END stream is checked against the model's own logits and a
model it does not reproduce is refused.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from blockattn.analysis import circuits


def _parts(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("input_layernorm", "post_attention_layernorm", "mlp")
    if layers is None or not all(hasattr(layer, a) for layer in layers for a in needed) or not all(
            hasattr(layer.self_attn, "q_proj") and hasattr(layer.self_attn, "o_proj") for layer in layers):
        raise ValueError("path patching needs Llama-style decoder layers (input_layernorm, self_attn.q_proj / "
                         "o_proj, post_attention_layernorm, mlp)")
    return inner, layers


def _check_pairs(clean, corrupt, tokenizer):
    if not isinstance(clean, (list, tuple)) or not isinstance(corrupt, (list, tuple)):
        raise TypeError("clean and corrupt must be lists of circuits.Prompt")
    if len(clean) != len(corrupt) or not clean:
        raise ValueError(f"clean and corrupt must be non-empty and pair up, got {len(clean)} and {len(corrupt)}")
    for a, b in zip(clean, corrupt):
        la = len(tokenizer(a.text, add_special_tokens=False).input_ids)
        lb = len(tokenizer(b.text, add_special_tokens=False).input_ids)
        if la != lb:
            raise ValueError(f"corrupted prompt is {lb} tokens, its clean twin {la}: they must align token for "
                             f"token ({b.text!r} vs {a.text!r})")


class Run:
    """One pass over prompts: END head outputs `z [N, layers, H, D]`, END token ids `[N]`, logit diffs `[N]`
    (answer - foil of the clean prompts), the token ids `[N, L]` grouped by length."""

    def __init__(self, model, tokenizer, prompts, scored, *, batch_size=32):
        from blockattn import analysis

        device = next(model.parameters()).device
        n = len(prompts)
        self.ids = [None] * n
        self.z, self.logit_diff = None, torch.zeros(n, device=device)
        answer = torch.tensor([circuits.word_id(tokenizer, p.answer) for p in scored], device=device)
        foil = torch.tensor([circuits.word_id(tokenizer, p.foil) for p in scored], device=device)
        with torch.no_grad(), circuits._patched(model), analysis.hooks(model) as h:
            for chunk, ids in circuits._batches(tokenizer, prompts, batch_size):
                h.clear()
                h.record_outputs(positions=[ids.shape[1] - 1])
                logits = model(ids.to(device), logits_to_keep=1).logits[:, -1].float()
                z = torch.stack([h.outputs[layer][0][:, :, 0].float() for layer in range(h.layers)], 1)
                if self.z is None:
                    self.z = torch.zeros(n, *z.shape[1:], device=device)
                index = torch.tensor(chunk, device=device)
                self.z[index] = z
                self.logit_diff[index] = logits.gather(1, answer[index, None])[:, 0] - logits.gather(
                    1, foil[index, None])[:, 0]
                for j, i in enumerate(chunk):
                    self.ids[i] = ids[j]
        self.last = torch.stack([ids[-1] for ids in self.ids]).to(device)
        self.answer, self.foil = answer, foil


def _o_proj(layer, z):
    """`z [..., H, D]` -> `[..., d_model]` through the layer's o_proj."""
    return layer.self_attn.o_proj(z.flatten(-2).to(layer.self_attn.o_proj.weight.dtype)).float()


def _head_results(layer, z):
    """`[..., H, d_model]`: each head's share of o_proj (no bias: split it off)."""
    return circuits.project_heads(layer.self_attn.o_proj.weight, z)


class _EndStream:
    """The END residual stream with every head frozen to the clean run: `inputs[l]` is layer l's input
    `[N, d_model]`, `attn[l]` its frozen attention output."""

    def __init__(self, model, clean: Run):
        inner, layers = _parts(model)
        self.model, self.inner, self.layers = model, inner, layers
        with torch.no_grad():
            r = inner.embed_tokens(clean.last).float()
            self.inputs, self.attn = [], []
            for layer, z in zip(layers, clean.z.unbind(1)):
                self.inputs.append(r)
                a = _o_proj(layer, z)
                self.attn.append(a)
                r = self.mlp(layer, r + a)
            self.final = r
            w = model.get_output_embeddings().weight
            self.direction = (w[clean.answer] - w[clean.foil]).float()  # [N, d_model]
            got = self.logit_diff(r)
        if not torch.allclose(got, clean.logit_diff, atol=1e-3 * max(1.0, float(clean.logit_diff.abs().max()))):
            raise ValueError("the END stream does not reproduce the model's logits (max error "
                             f"{float((got - clean.logit_diff).abs().max()):.3g}): unsupported architecture")

    @staticmethod
    def mlp(layer, h):
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logit_diff(self, r):
        """`r [..., N, d_model]` final residuals -> `[..., N]` answer - foil logits."""
        return (self.inner.norm(r) * self.direction).sum(-1)

    def sender_streams(self, layer_index, delta):
        """`delta [S, N, d_model]` added to layer `layer_index`'s attention output; yields (l, input of layer
        l) for l > layer_index, then (None, final residual)."""
        layer = self.layers[layer_index]
        r = self.mlp(layer, self.inputs[layer_index] + self.attn[layer_index] + delta)
        for l in range(layer_index + 1, len(self.layers)):
            yield l, r
            r = self.mlp(self.layers[l], r + self.attn[l])
        yield None, r


def _normalise(patched: Tensor, clean: Run, corrupt: Run) -> Tensor:
    base, worst = float(clean.logit_diff.mean()), float(corrupt.logit_diff.mean())
    if abs(base - worst) < 1e-6:
        raise ValueError("clean and corrupted runs have the same mean logit difference: nothing to normalise by")
    return (patched - base) / (base - worst)


def runs(model, tokenizer, clean, corrupt, *, batch_size: int = 32) -> tuple[Run, Run]:
    """The clean and corrupted passes (corrupted prompts scored with their clean twins' answer and foil)."""
    _check_pairs(clean, corrupt, tokenizer)
    return (Run(model, tokenizer, clean, clean, batch_size=batch_size),
            Run(model, tokenizer, corrupt, clean, batch_size=batch_size))


def heads_to_logits(model, tokenizer, clean, corrupt, *, cached=None) -> Tensor:
    """`[layers, heads]` path-patching score of every head -> logits (see the module docstring); `cached`:
    `runs(...)` already made."""
    clean_run, corrupt_run = cached or runs(model, tokenizer, clean, corrupt)
    with torch.no_grad():
        stream = _EndStream(model, clean_run)
        rows = []
        for s, layer in enumerate(stream.layers):
            delta = _head_results(layer, corrupt_run.z[:, s] - clean_run.z[:, s]).transpose(0, 1)  # [H, N, d]
            *_, (_, final) = stream.sender_streams(s, delta)
            rows.append(stream.logit_diff(final).mean(-1))
        return _normalise(torch.stack(rows), clean_run, corrupt_run)


def heads_to_queries(model, tokenizer, clean, corrupt, receivers, *, cached=None, chunk: int = 256) -> Tensor:
    """`[layers, heads]` path-patching score of every head -> the queries of `receivers` [(layer, head)] at
    END; heads in or after the last receiver layer cannot reach a receiver and score 0. `chunk`: the most
    (prompt, sender) rows decoded at once (fewer when their copied KV caches would pass ~300 MB)."""
    clean_run, corrupt_run = cached or runs(model, tokenizer, clean, corrupt)
    receivers = sorted({tuple(r) for r in receivers})
    if not receivers:
        raise ValueError("receivers must name at least one (layer, head)")
    inner, layers = _parts(model)
    n, n_layers, heads, dim = clean_run.z.shape
    for layer, head in receivers:
        if not (0 <= layer < n_layers and 0 <= head < heads):
            raise ValueError(f"receiver {(layer, head)} is outside {n_layers} layers x {heads} heads")
    by_layer: dict[int, list[int]] = {}
    for layer, head in receivers:
        by_layer.setdefault(layer, []).append(head)
    senders = [(s, h) for s in range(max(by_layer)) for h in range(heads)]
    scores = torch.zeros(n_layers, heads, device=clean_run.z.device)
    with torch.no_grad():
        stream = _EndStream(model, clean_run)
        # queries each sender's frozen run gives the receivers: {layer: [S, N, Hq * D]} (the full q_proj row;
        # only the receivers' columns are used)
        queries = {l: [] for l in by_layer}
        for s in range(max(by_layer)):
            layer = stream.layers[s]
            delta = _head_results(layer, corrupt_run.z[:, s] - clean_run.z[:, s]).transpose(0, 1)
            clean_q = {l: layers[l].self_attn.q_proj(layers[l].input_layernorm(stream.inputs[l]))
                       for l in by_layer if l <= s}
            for l, r in stream.sender_streams(s, delta):
                if l is None or l > max(by_layer):
                    break  # nothing above the last receiver is needed
                if l in by_layer:
                    queries[l].append(layers[l].self_attn.q_proj(layers[l].input_layernorm(r)))
            for l, q in clean_q.items():  # receivers at or before the sender's layer see the clean query
                queries[l].append(q.expand(heads, *q.shape))
        queries = {l: torch.cat(qs) for l, qs in queries.items()}  # [senders, N, Hq * D], layer-major senders
        patched = _decode_with_queries(model, clean_run, queries, by_layer, dim, chunk)  # [S, N]
        effect = _normalise(patched.mean(-1), clean_run, corrupt_run)
        for (s, h), e in zip(senders, effect):
            scores[s, h] = e
    return scores


def _decode_with_queries(model, clean_run, queries, by_layer, dim, chunk, memory=3e8):
    """`[S, N]` logit diffs of the clean prompts with END queries of the receiver heads replaced by
    `queries[l][sender, prompt]`: one decoding step over each clean prefix's KV cache."""
    senders = next(iter(queries.values())).shape[0]
    out = torch.zeros(senders, len(clean_run.ids), device=clean_run.z.device)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(clean_run.ids):
        groups.setdefault(ids.numel(), []).append(i)
    _, layers = _parts(model)
    current = {}

    def hook_for(l):
        def hook(module, args, output):
            q = current.get(l)
            if q is None:
                return output
            output = output.clone()
            for head in by_layer[l]:
                cols = slice(head * dim, (head + 1) * dim)
                output[:, -1, cols] = q[:, cols].to(output.dtype)
            return output
        return hook

    device = clean_run.z.device
    handles = [layers[l].self_attn.q_proj.register_forward_hook(hook_for(l)) for l in by_layer]
    try:
        with circuits._patched(model):
            for _, members in sorted(groups.items()):
                index = torch.tensor(members, device=device)
                ids = torch.stack([clean_run.ids[i] for i in members]).to(device)
                current.clear()
                cache = model(ids[:, :-1], use_cache=True).past_key_values
                per_row = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                              for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                              if isinstance(t, Tensor)) / len(members)
                rows = min(chunk, max(1, int(memory / per_row))) if per_row else chunk  # the copied caches' size
                per = max(1, rows // len(members))
                for start in range(0, senders, per):
                    span = range(start, min(senders, start + per))
                    c = copy.deepcopy(cache)
                    c.batch_repeat_interleave(len(span))  # prompt-major: row = prompt * len(span) + sender
                    for l, q in queries.items():
                        current[l] = q[span.start:span.stop][:, index].transpose(0, 1).flatten(0, 1)
                    last = ids[:, -1:].repeat_interleave(len(span), 0)
                    logits = model(last, past_key_values=c, use_cache=True).logits[:, -1].float()
                    current.clear()
                    a = clean_run.answer[index].repeat_interleave(len(span))
                    f = clean_run.foil[index].repeat_interleave(len(span))
                    diff = logits.gather(1, a[:, None])[:, 0] - logits.gather(1, f[:, None])[:, 0]
                    out[span.start:span.stop][:, index] = diff.view(len(members), len(span)).T
    finally:
        for handle in handles:
            handle.remove()
    return out


def top_heads(scores: Tensor, fraction: float = 0.02, *, sign: int = -1) -> list:
    """The top `fraction` of heads (at least one) by `sign * score` (default: most negative first, the heads
    whose corrupted path hurts the logit difference most), as (layer, head) pairs best first."""
    return _order(sign * scores)[:_count(scores, fraction)]


def ranking(scores: Tensor, *, sign: int = -1) -> "circuits.Ranking":
    """A `circuits.Ranking` (most important first by `sign * score`) for the ablation check."""
    return circuits.Ranking(scores, _order(sign * scores))


def _order(key: Tensor) -> list:
    """(layer, head) pairs of a `[layers, heads]` tensor, largest key first."""
    return [divmod(int(i), key.shape[1]) for i in key.flatten().argsort(descending=True)]


def _count(scores: Tensor, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, round(fraction * scores.numel()))


def staged_circuit(model, tokenizer, clean, corrupt, *, fraction: float = 0.02, progress=None) -> dict:
    """Merullo et al.'s staged discovery, two stages: (1) every head -> logits; the movers are the top
    `fraction` by most negative score; (2) every head -> the movers' queries at END (the inhibition stage).
    The circuit is the union of each stage's top `fraction` by |score| (heads that help or hurt: the IOI
    circuit keeps negative movers). `combined`: a ranking by each head's most negative stage score, for the
    ablation check. (The paper's third stage, into the inhibition heads' keys and values, is not run.)"""
    cached = runs(model, tokenizer, clean, corrupt)
    logits = heads_to_logits(model, tokenizer, clean, corrupt, cached=cached)
    movers = top_heads(logits, fraction)
    if progress:
        progress(f"path patching stage 1 (heads -> logits) done; movers {movers}")
    queries = heads_to_queries(model, tokenizer, clean, corrupt, movers, cached=cached)
    if progress:
        progress("path patching stage 2 (heads -> movers' queries) done")
    by_abs = [h for scores in (logits, queries) for h in _order(scores.abs())[:_count(scores, fraction)]]
    circuit = list(dict.fromkeys(by_abs))
    return dict(logits=logits, queries=queries, movers=movers, circuit=circuit,
                combined=ranking(torch.minimum(logits, queries)),
                clean_logit_diff=float(cached[0].logit_diff.mean()),
                corrupt_logit_diff=float(cached[1].logit_diff.mean()))


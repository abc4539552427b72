"""MoA calibration: attention influence on the model's own answers, then per-head spans under a budget.

    python -m blockattn.kv.moa_calibrate --model smollm2-135m --out moa_plan.json --lengths 1024 2048

1. Calibration set: long documents with a question; the dense model writes its own answers (MoA's
   "model alignment"); the loss is the cross-entropy of those answer tokens only.
2. Influence (MoA `modify_llama_profile.py:129-195`): with G = ∂L/∂A, removing entry (i, j) and
   renormalising the row changes the loss by ΔL_ij ≈ A_ij·(Σ_k A_ik G_ik − G_ij)/(1 − A_ij); |ΔL| is summed
   over 64×64 blocks and averaged over samples. G = dO·Vᵀ comes from the gradient of each layer's attention
   output, streamed over query chunks (no [L, L] tensor is kept). Summed over each GQA group (per KV head).
3. Choice: configs (α, β) on MoA's grid (α step 1024, β ∈ {0, 1/8, …, 1}); a config's loss at a profiled
   length is the influence outside its layout (band + sink block); its cost the kept blocks at the
   longest profiled length. Per density ρ, an exact dynamic programme over the integer block budget
   minimises the summed (per-length normalised) loss with mean density ≤ ρ. Deviations from the official
   MILP (gurobi): one density budget, at `budget_length` (default the longest profiled length; MoA
   constrains every profiled and extended length), no ≤ 2-configs-per-layer constraint, no Pareto or
   validation step.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from blockattn.kv.moa import block_layout

QUESTION = "\n\nQuestion: what is the text above about? Answer in two sentences.\nAnswer:"


def grid(lengths: list[int], extend: int) -> list[tuple[float, float]]:
    """MoA's (α, β) grid and validity rule (`elastic_generate.py:151-155`, `elastic_block_sparse.py:51`)."""
    n_min, n_pmax = min(lengths), max(lengths)
    count = (n_pmax + n_min) // 1024 + 1
    alphas = torch.linspace(-n_min, n_pmax, count).tolist()
    betas = torch.linspace(0, 1, 9).tolist()
    return [(a, b) for a in alphas for b in betas
            if a + b * n_pmax <= n_pmax and a + b * extend <= extend and a + b * n_min > 0]


def influence_blocks(q, k, v, grad_out, scale: float, block: int = 64) -> torch.Tensor:
    """One layer: `q, grad_out [Hq, L, D]`, `k, v [Hkv, L, D]` -> Σ |ΔL| per block, summed over each GQA
    group: `[Hkv, nb, nb]`."""
    hq, n, _ = q.shape
    kv_heads = k.shape[0]
    group = hq // kv_heads
    nb = -(-n // block)
    k, v = k.repeat_interleave(group, 0).float(), v.repeat_interleave(group, 0).float()
    total = torch.zeros(hq, nb, nb, device=q.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = torch.arange(start, stop, device=q.device)
        cols = torch.arange(stop, device=q.device)     # keys after the chunk's last row are masked: skip them
        logits = torch.einsum("hqd,hkd->hqk", q[:, rows].float(), k[:, :stop]) * scale
        logits = logits.masked_fill(cols > rows[:, None], float("-inf"))
        attn = logits.softmax(-1)
        g = torch.einsum("hqd,hkd->hqk", grad_out[:, rows].float(), v[:, :stop])
        expected = (attn * g).sum(-1, keepdim=True)
        delta = attn * (expected - g) / (1 - attn).clamp_min(1e-6)
        delta = torch.where(rows[:, None] == 0, attn * g, delta)     # row 0 sees only itself (MoA :166)
        padded = torch.zeros(hq, delta.shape[1], nb * block, device=q.device)
        padded[..., :stop] = delta.abs()
        total[:, start // block] = padded.view(hq, -1, nb, block).sum((1, 3))
    return total.view(kv_heads, group, nb, nb).sum(1)


def profile(model, tokenizer, length: int, samples: int, answer_tokens: int = 32, seed: int = 0,
            checkpoint: bool = False):
    """Mean block influence `[L, Hkv, nb, nb]` over `samples` documents of `length` tokens."""
    from blockattn.bench.tasks import document_text
    q_ids = tokenizer(QUESTION, add_special_tokens=False).input_ids
    total = None
    for s in range(samples):
        text = tokenizer(document_text(length * 8, seed=seed + s), add_special_tokens=False).input_ids
        prompt = torch.tensor([text[:length - answer_tokens - len(q_ids)] + q_ids], device=model.device)
        with torch.no_grad():
            ids = model.generate(prompt, max_new_tokens=answer_tokens, do_sample=False, min_new_tokens=answer_tokens)
        stacked = influence_on(model, ids, prompt.shape[1], checkpoint=checkpoint)
        total = stacked if total is None else total + stacked
    return total / samples


def influence_on(model, ids, start: int, block: int = 64, checkpoint: bool = False) -> torch.Tensor:
    """Block influence `[L, Hkv, nb, nb]` of one sequence whose tokens from `start` on are the answer.
    `checkpoint`: recompute each decoder layer in the backward pass instead of keeping its activations
    (an 8k profile of SmolLM2 would otherwise hold ~13 GB); the gradients are the same."""
    import functools

    from torch.utils.checkpoint import checkpoint as recompute
    from transformers.modeling_layers import GradientCheckpointingLayer

    from blockattn import hf
    from blockattn.integrations.hf import attention_modules
    from blockattn.kv.base import Policy, Selection

    class Observe(Policy):
        compresses = False

        def select(self, layer, query, key, value, scale):
            return Selection([])

    captured, grads = {}, {}
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    hooks, wrapped = [], []
    for module in attention_modules(model):
        def keep_grad(mod, args, _layer=module.layer_idx):
            # under `checkpoint` the recomputed forward registers a second hook on a tensor no gradient
            # reaches; the first forward's hook is the one that fires
            if args[0].requires_grad:
                args[0].register_hook(lambda g: grads.__setitem__(_layer, g.detach()))
        hooks.append(module.o_proj.register_forward_pre_hook(keep_grad))
    if checkpoint:
        for layer in model.modules():
            if isinstance(layer, GradientCheckpointingLayer):
                layer.forward = functools.partial(recompute, layer.forward, use_reentrant=False)
                wrapped.append(layer)
    try:
        with hf.patch(model, kv=Observe()):
            runtime = next(m for m in model.modules() if hasattr(m, "_blockattn_kv"))._blockattn_kv
            runtime.observer = lambda layer, q, k, v, scale: captured.__setitem__(
                layer, (q.detach(), k.detach(), v.detach(), scale))
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            # only the answer's logits: the full-vocabulary logits of an 8k sequence would be 1.6 GB (+ grad)
            logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=ids.shape[1] - start + 1).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, start:])
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
        for layer in wrapped:
            del layer.forward       # back to the class's forward
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    layers = []
    for layer in sorted(captured):
        q, k, v, scale = captured[layer]
        d = q.shape[-1]
        g = grads[layer][0].view(-1, q.shape[1], d).transpose(0, 1)   # [Hq, L, D]
        layers.append(influence_blocks(q[0], k[0], v[0], g, scale, block).cpu())
    return torch.stack(layers)


def config_tables(influence: dict[int, torch.Tensor], configs, block: int = 64, budget_length: int | None = None):
    """Summed over profiled lengths, loss `[L·Hkv, C]` (influence outside each config's layout, normalised by
    the head-summed total at that length); and each config's kept blocks of the last row at `budget_length`
    (default: the longest profiled length) `[C]`, with that length's block count."""
    losses = []
    for n, z in sorted(influence.items()):
        nb = z.shape[-1]
        flat = z.flatten(0, 1)                                   # [L·Hkv, nb, nb]
        total = flat.sum((1, 2))
        loss = torch.stack([total - (flat * block_layout(a, b, nb, block)).sum((1, 2)) for a, b in configs], 1)
        losses.append(loss / total.sum().clamp_min(1e-30))
    nb = -(-(budget_length or max(influence)) // block)
    kept = torch.tensor([int(block_layout(a, b, nb, block)[-1].sum()) for a, b in configs])
    return sum(losses), kept, nb


def choose(loss: torch.Tensor, cost: torch.Tensor, budget: int) -> list[int]:
    """Exact: config per head (rows of `loss [H, C]`) minimising Σ loss with Σ cost ≤ `budget` (integers)."""
    heads, configs = loss.shape
    inf = float("inf")
    best = torch.zeros(budget + 1, dtype=torch.float64)
    picks = torch.zeros(heads, budget + 1, dtype=torch.long)
    for h in range(heads):
        new = torch.full((budget + 1,), inf, dtype=torch.float64)
        for c in range(configs):
            u = int(cost[c])
            if u > budget:
                continue
            cand = torch.full((budget + 1,), inf, dtype=torch.float64)
            cand[u:] = best[:budget + 1 - u] + float(loss[h, c])
            better = cand < new
            new = torch.where(better, cand, new)
            picks[h][better] = c
        best = new
    if torch.isinf(best[budget]):
        raise ValueError(f"moa: no plan fits a budget of {budget} blocks")
    chosen, b = [], budget
    for h in reversed(range(heads)):
        c = int(picks[h, b])
        chosen.append(c)
        b -= int(cost[c])
    return chosen[::-1]


def calibrate(model, tokenizer, *, lengths=(1024, 2048), extend: int = 8192, samples: int = 2,
              densities=(0.5, 0.3, 0.1), block: int = 64, seed: int = 0, influence: dict | None = None,
              budget_length: int | None = None, checkpoint: bool = False) -> dict:
    """A plan `{"spans": {density: [layer][kv_head] -> (α, β)}, ...}`; densities no grid config can reach
    are listed under "infeasible". `influence` (a previous run's profile, `{length: [L, Hkv, nb, nb]}`)
    skips profiling the lengths it holds; the others in `lengths` are profiled, and lengths it holds
    outside `lengths` are not used."""
    config = model.config
    layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
    influence = {int(n): z for n, z in (influence or {}).items()}
    influence = {n: influence[n] if n in influence else profile(model, tokenizer, n, samples, seed=seed,
                                                                checkpoint=checkpoint) for n in lengths}
    configs = grid(list(lengths), extend)
    loss, kept, nb = config_tables(influence, configs, block, budget_length)
    if nb * block > max(lengths):
        # every config that covers the longest profile whole has zero loss: the profile cannot tell a head
        # that needs 2k from one that needs 8k, and the choice among them is arbitrary (stop 11: a 1k/2k
        # profile solved at 8k gave a zero-loss plan whose long heads were simply the last layers)
        warnings.warn(f"moa: budget at {nb * block} tokens but the longest profile is {max(lengths)}: spans "
                      "beyond it are not informed by the profile; profile at the target length", stacklevel=2)
    spans, infeasible, total = {}, {}, {}
    for density in densities:
        try:
            chosen = choose(loss, kept, int(density * nb * layers * kv_heads))
        except ValueError as error:
            infeasible[f"{density:.3g}"] = f"{error}; the sparsest grid config keeps {int(kept.min())}/{nb} blocks"
            continue
        spans[f"{density:.3g}"] = [[list(configs[chosen[l * kv_heads + h]]) for h in range(kv_heads)]
                                   for l in range(layers)]
        total[f"{density:.3g}"] = float(sum(loss[h, c] for h, c in enumerate(chosen)))
    return {"method": "moa", "lengths": list(lengths), "extend": extend, "budget_length": nb * block,
            "samples": samples, "block": block, "loss": total,
            "spans": spans, "infeasible": infeasible, "influence": influence,
            "deviations": "per KV head; one density budget (at budget_length); no per-layer config limit; no "
                          "Pareto/validation step (see moa_calibrate.py)"}


def main(argv=None):
    parser = argparse.ArgumentParser(description="MoA calibration: write a span plan (JSON) for hf.patch(kv=...)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="moa_plan.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3, 0.1])
    parser.add_argument("--influence", default=None,
                        help="reuse the profile saved by a previous run (.pt): only --lengths it lacks are profiled")
    parser.add_argument("--checkpoint", action="store_true",
                        help="recompute layers in the backward pass (bounded memory for 4k-8k profiles)")
    parser.add_argument("--budget-length", type=int, default=None,
                        help="length at which the mean density must meet the budget (default: longest profiled)")
    args = parser.parse_args(argv)
    import blockattn
    start = time.perf_counter()
    model, tokenizer = blockattn.models.load(args.model)
    influence = torch.load(args.influence) if args.influence else None
    plan = calibrate(model, tokenizer, lengths=args.lengths, samples=args.samples, densities=args.densities,
                     influence=influence, budget_length=args.budget_length, checkpoint=args.checkpoint)
    torch.save(plan.pop("influence"), args.out + ".influence.pt")
    plan["model"] = args.model
    with open(args.out, "w") as f:
        json.dump(plan, f)
    print(f"wrote {args.out} (densities {sorted(plan['spans'])}; loss {plan['loss']}; infeasible: "
          f"{plan['infeasible'] or 'none'}) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

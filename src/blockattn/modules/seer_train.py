"""SeerAttention gates distilled on SmolLM2's real attention (`blockattn train seer`).

One layer's post-RoPE q, k, v are captured from prefills of Python's documentation text (the eval
harness's document, one seed per window; the forward stops after that layer); pre-RoPE q, k come
from inverting the model's own rotary embedding. The gate (Qavg_Kmaxminavg, gate_dim 128, block 64)
trains on the block-max ground truth with the official loss (AdamW lr 1e-3, 20 warm-up steps then
cosine, one window per step, base model frozen) and is compared on held-out windows, at densities
0.1 / 0.25 / 0.5 with the nz_ratio top-k rule (last rows not forced dense and the diagonal kept for
every selector, so only selection differs), with the untrained gate, a training-free pooled score
(avg-pooled post-RoPE q . k, as MoBA/Quest), and the oracle top-k of the ground truth: attention
recall (mean over queries of the probability mass inside the kept tiles) and the layer output's
relative error through the engine.
"""
from __future__ import annotations

import math
import time

import torch

import blockattn
from blockattn.layout import BlockLayout
from blockattn.modules.seer_gate import (SeerAttentionGate, _pool, block_max_ground_truth, gate_loss, invert_rope,
                                         model_rope_theta, select_blocks)

DENSITIES = (0.1, 0.25, 0.5)


class _Stop(Exception):
    pass


def capture_layers(model, ids: torch.Tensor, layers) -> tuple[dict, tuple]:
    """Post-RoPE `{layer: (q, k, v)}` of the given attention layers for `ids [1, L]` (one forward, stopped
    after the last of them), and the model's `(cos, sin)`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    wanted, last, captured = set(layers), max(layers), {}

    def record(module, query, key, value, attention_mask, **kwargs):
        index = getattr(module, "layer_idx", None)
        if index in wanted:
            captured[index] = (query.detach().float(), key.detach().float(), value.detach().float())
        if index == last:
            raise _Stop
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("blockattn_seer_capture", record)
    AttentionMaskInterface.register("blockattn_seer_capture", sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("blockattn_seer_capture")
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        model.set_attn_implementation(previous)
    some_v = captured[last][2]
    positions = torch.arange(ids.shape[1]).view(1, -1)
    cos, sin = model.model.rotary_emb(some_v, positions)
    return captured, (cos.float().unsqueeze(1), sin.float().unsqueeze(1))


def capture_layer(model, ids: torch.Tensor, layer: int):
    """Post-RoPE `(q, k, v)` of one attention layer for `ids [1, L]`, and the model's `(cos, sin)`."""
    captured, rope = capture_layers(model, ids, [layer])
    return captured[layer], rope


def prepare_layer_windows(model, tokenizer, *, count: int, length: int, layers, seed: int, block_size: int = 64,
                          keep_qkv: bool = True) -> dict[int, list[dict]]:
    """`{layer: [window]}` for `count` documentation windows; each window holds the gate's inputs (pre-RoPE
    q, k) and its target, plus the post-RoPE q, k, v when `keep_qkv` (needed to evaluate, not to train)."""
    from blockattn.bench.tasks import document_ids
    out = {layer: [] for layer in layers}
    for i in range(count):
        ids = document_ids(tokenizer, length, seed=seed + i)
        captured, (cos, sin) = capture_layers(model, ids, layers)
        for layer, (q, k, v) in captured.items():
            window = dict(q_nope=invert_rope(q, cos, sin), k_nope=invert_rope(k, cos, sin),
                          target=block_max_ground_truth(q, k, block_size=block_size))
            if keep_qkv:
                window.update(q=q, k=k, v=v)
            out[layer].append(window)
    return out


def prepare_windows(model, tokenizer, *, count: int, length: int, layer: int, seed: int, block_size: int = 64):
    return prepare_layer_windows(model, tokenizer, count=count, length=length, layers=[layer], seed=seed,
                                 block_size=block_size)[layer]


def pooled_logits(q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """The training-free baseline: avg-pooled post-RoPE q against avg-pooled post-RoPE k, block-causal."""
    q_bar = _pool(q, block_size, "avg")
    k_bar = _pool(k, block_size, "avg").repeat_interleave(q.shape[1] // k.shape[1], 1)
    n = q_bar.shape[2]
    logits = q_bar @ k_bar.transpose(-1, -2)
    return logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))


def attention_recall(q, k, layout: BlockLayout) -> float:
    """Mean over queries and heads of the causal attention probability inside the layout's tiles
    (one query block at a time)."""
    batch, heads, length, dim = q.shape
    keys = k.repeat_interleave(heads // k.shape[1], 1)
    keep = layout.expand(batch, heads).to_dense()
    b = layout.block_q
    total = 0.0
    cols = torch.arange(length)
    for block in range(layout.num_q_blocks):
        lo, hi = block * b, min(length, (block + 1) * b)
        scores = q[:, :, lo:hi] @ keys.transpose(-1, -2) / math.sqrt(dim)
        scores = scores.masked_fill(cols.view(1, -1) > torch.arange(lo, hi).view(-1, 1), float("-inf"))
        probs = torch.softmax(scores, -1)
        kept = keep[:, :, block].repeat_interleave(layout.block_k, -1)[..., :length]
        total += float((probs * kept.unsqueeze(2)).sum())
    return total / (batch * heads * length)


def train_gate(windows, *, heads_q, heads_kv, head_dim, rope_theta, steps=300, lr=1e-3, seed=0, progress=None):
    torch.manual_seed(seed)
    gate = SeerAttentionGate(heads_q, heads_kv, head_dim, rope_theta=rope_theta)
    optimiser = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=0.0)
    warmup = 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup)
                                                                                    / max(1, steps - warmup))))
    losses = []
    for step in range(steps):
        w = windows[step % len(windows)]
        loss = gate_loss(gate(w["q_nope"], w["k_nope"]), w["target"])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    gate.trained_steps += steps
    return gate, losses


@torch.no_grad()
def evaluate(trained, untrained, windows, *, densities=DENSITIES, block_size=64) -> list[dict]:
    rows = []
    for density in densities:
        sums: dict[str, list[float]] = {}
        for w in windows:
            q, k, v, length = w["q"], w["k"], w["v"], w["q"].shape[2]
            n = -(-length // block_size)
            dense = blockattn.attention(q, k, v, BlockLayout.from_dense(torch.ones(n, n, dtype=torch.bool),
                                        q_len=length, k_len=length, block_q=block_size, block_k=block_size,
                                        causal=True))
            candidates = {"trained gate": trained(w["q_nope"], w["k_nope"]),
                          "untrained gate": untrained(w["q_nope"], w["k_nope"]),
                          "pooled q.k (MoBA-like)": pooled_logits(q, k, block_size),
                          "oracle top-k": torch.log(w["target"])}
            for name, logits in candidates.items():
                # last rows not dense and the diagonal kept for every selector: they differ only in what they choose
                layout = select_blocks(logits, length=length, block_size=block_size, density=density,
                                       last_block_dense=False, force_diagonal=True)
                out = blockattn.attention(q, k, v, layout)
                error = float((out - dense).norm() / dense.norm())
                kl = float(gate_loss(logits, w["target"], scale=1.0)) if name != "oracle top-k" else 0.0
                sums.setdefault(name, []).append((attention_recall(q, k, layout), error, layout.density("causal"), kl))
        for name, values in sums.items():
            recall, error, measured, kl = (sum(x[i] for x in values) / len(values) for i in range(4))
            rows.append(dict(density=density, selector=name, recall=recall, output_error=error,
                             measured_density=measured, block_kl=kl))
    return rows


def run(*, model_name: str = "smollm2-135m", layer: int | None = 15, layers=None, length: int = 2048,
        train_windows: int = 12, eval_windows: int = 4, steps: int = 300, seed: int = 0, progress=None) -> dict:
    """Capture, train one gate per layer (`layers`, or the single `layer`), evaluate on held-out windows.
    With several layers the table's rows are means over the layers and `per_layer` holds each layer's
    trained-gate recall at every density; `gates` is `{layer: gate}`."""
    from blockattn.models import load

    model, tokenizer = load(model_name)
    config = model.config
    layers = sorted(set(range(config.num_hidden_layers) if layers == "all" else layers or [layer]))
    if not all(0 <= i < config.num_hidden_layers for i in layers):
        raise ValueError(f"layers must lie in [0, {config.num_hidden_layers}), got {layers}")
    start = time.perf_counter()
    training = prepare_layer_windows(model, tokenizer, count=train_windows, length=length, layers=layers, seed=seed,
                                     keep_qkv=False)
    held_out = prepare_layer_windows(model, tokenizer, count=eval_windows, length=length, layers=layers,
                                     seed=seed + train_windows)
    capture_seconds = time.perf_counter() - start
    shape = dict(heads_q=config.num_attention_heads, heads_kv=config.num_key_value_heads,
                 head_dim=config.hidden_size // config.num_attention_heads,
                 rope_theta=model_rope_theta(config))
    gates, losses, per_layer, rows_by_layer, train_seconds = {}, {}, {}, [], 0.0
    for index in layers:
        start = time.perf_counter()
        gates[index], losses[index] = train_gate(training.pop(index), steps=steps, seed=seed, progress=progress,
                                                 **shape)
        train_seconds += time.perf_counter() - start
        torch.manual_seed(seed)
        rows = evaluate(gates[index], SeerAttentionGate(**shape), held_out.pop(index))
        rows_by_layer.append(rows)
        per_layer[index] = {r["density"]: r["recall"] for r in rows if r["selector"] == "trained gate"}
    keys = ("recall", "output_error", "measured_density", "block_kl")
    rows = [dict(first, **{key: sum(r[i][key] for r in rows_by_layer) / len(rows_by_layer) for key in keys})
            for i, first in enumerate(rows_by_layer[0])]
    return dict(model=model_name, layer=layers[0] if len(layers) == 1 else layers, length=length,
                train_windows=train_windows, eval_windows=eval_windows, steps=steps, seed=seed,
                losses=losses[layers[0]] if len(layers) == 1 else [sum(v) / len(v) for v in zip(*losses.values())],
                capture_seconds=capture_seconds, train_seconds=train_seconds, rows=rows, per_layer=per_layer,
                gates=gates)

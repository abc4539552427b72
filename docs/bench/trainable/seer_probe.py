"""Where SeerAttention's perplexity cost comes from (docs/bench/trainable.md, stop 11).

On the `blockattn eval` perplexity document (Python's documentation, seed 0, scored on its last
`--tail` tokens against the unpatched model, as the harness does), each setting patches SmolLM2 and
reports the mean per-token NLL difference (nats) and the mean causal density of the layouts it built
(over layers and heads). Settings: the trained gates (official rule, and with the diagonal forced),
the oracle top-k of the same rule (block-max ground truth of each layer's own attention: the best any
gate could do under this rule), the gates with some layers left dense, and per-layer (one layer sparse,
the rest dense). `--recall` adds, per layer, the attention recall of the gate's and the oracle's
layouts on the same document.

    OMP_NUM_THREADS=1 nice .venv/bin/python docs/bench/trainable/seer_probe.py --gates G --length 4096
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch

from blockattn import hf, methods
from blockattn.bench import tasks
from blockattn.methods.base import Method
from blockattn.modules.seer_gate import block_max_ground_truth, select_blocks


@dataclasses.dataclass
class Oracle(Method):
    """SeerAttention's selection rule applied to the layer's true block-max attention map."""

    density: float | None = 0.25
    threshold: float | None = None
    block_size: int = 64
    causal_modes = (True,)
    any_lengths = False
    within_block_lookahead = True

    def _select(self, q, k, *, causal, grid, layer):
        target = block_max_ground_truth(q, k, block_size=self.block_size)
        return select_blocks(target.log(), length=q.shape[2], block_size=self.block_size, density=self.density,
                             threshold=self.threshold, last_block_dense=True)


@dataclasses.dataclass
class Recorded(Method):
    """Delegates to `inner` and records each layout's causal density."""

    inner: Method | None = None
    log: list = dataclasses.field(default_factory=list)
    causal_modes = (True,)
    any_lengths = False
    within_block_lookahead = True

    def _select(self, q, k, *, causal, grid, layer):
        layout = self.inner.select(q, k, causal=causal, layer=layer)
        self.log.append(layout.density("causal"))
        return layout


def nll_delta(model, ids, dense, method, layers=None, tail=1024):
    wrapped = Recorded(inner=method)
    spec = None if layers is None else {i: (wrapped if s == "method" else s) for i, s in layers.items()}
    with hf.patch(model, None if layers is not None else wrapped, layers=spec):
        nll = tasks.token_nll(model, ids, tail=tail)
    density = sum(wrapped.log) / len(wrapped.log) if wrapped.log else 1.0
    return float((nll - dense).mean()), density


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gates", required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--tail", type=int, default=1024)
    parser.add_argument("--settings", nargs="*", default=["seer", "seer_diag", "oracle", "seer_dense0", "xattention"])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--recall", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from blockattn.models import load
    model, tokenizer = load("smollm2-135m")
    n_layers = model.config.num_hidden_layers
    ids = tasks.document_ids(tokenizer, args.length)
    dense = tasks.token_nll(model, ids, tail=args.tail)
    print(f"dense ppl {math.exp(float(dense.mean())):.3f} (L={args.length}, last {args.tail} tokens)", flush=True)
    seer = lambda **kw: methods.get("seer", gates=args.gates, **{"density": args.density, **kw})  # noqa: E731
    settings = {
        "seer": (seer(), None),
        "seer_diag": (seer(force_diagonal=True), None),
        "oracle": (Oracle(density=args.density), None),
        "seer_dense0": (seer(), {0: None, **{i: "method" for i in range(1, n_layers)}}),
        "seer_dense01": (seer(), {0: None, 1: None, **{i: "method" for i in range(2, n_layers)}}),
        "xattention": (methods.get("xattention"), None),
        "seer_d0.5": (seer(density=0.5), None),
        "oracle_d0.5": (Oracle(density=0.5), None),
    }
    for t in (2e-3, 5e-3, 1e-2, 1.5e-2, 2e-2):
        settings[f"seer_t{t:g}"] = (methods.get("seer", gates=args.gates, threshold=t), None)
        settings[f"oracle_t{t:g}"] = (Oracle(density=None, threshold=t), None)
    rows = []
    for name in args.settings:
        start = time.perf_counter()
        method, layers = settings[name]
        delta, density = nll_delta(model, ids, dense, method, layers, args.tail)
        rows.append(dict(setting=name, nll_delta=delta, density=density, seconds=time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
    if args.per_layer:
        for kind, method in (("seer", seer()), ("oracle", Oracle(density=args.density))):
            for layer in range(n_layers):
                start = time.perf_counter()
                delta, density = nll_delta(model, ids, dense, method, {layer: "method"}, args.tail)
                rows.append(dict(setting=f"{kind}_only_layer{layer}", nll_delta=delta, density=density,
                                 seconds=time.perf_counter() - start))
                print(json.dumps(rows[-1]), flush=True)
    if args.recall:
        from blockattn.modules.seer_gate import _rope_tables, invert_rope, load_gates
        from blockattn.modules.seer_train import attention_recall, capture_layers
        gates = load_gates(args.gates, model="smollm2-135m")
        captured, (cos, sin) = capture_layers(model, ids, list(range(n_layers)))
        for layer, (q, k, v) in sorted(captured.items()):
            q_nope, k_nope = invert_rope(q, cos, sin), invert_rope(k, cos, sin)
            with torch.no_grad():
                logits = gates[layer](q_nope, k_nope)
            target = block_max_ground_truth(q, k)
            row = dict(setting=f"recall_layer{layer}")
            for name, scores in (("gate", logits), ("oracle", target.log())):
                layout = select_blocks(scores, length=args.length, block_size=64, density=args.density)
                row[f"{name}_recall"] = attention_recall(q, k, layout)
            keep = select_blocks(logits, length=args.length, block_size=64, density=args.density,
                                 last_block_dense=False).to_dense()
            for t in (2e-3, 5e-3, 1e-2, 2e-2, 3e-2):
                for name, scores in (("gate", logits), ("oracle", target.log())):
                    row[f"{name}_t{t:g}_density"] = select_blocks(scores, length=args.length, block_size=64,
                                                                  threshold=t).density("causal")
            row["gate_diagonal_dropped"] = 1 - float(keep[..., torch.eye(keep.shape[-1], dtype=torch.bool)].float().mean())
            rows.append(row)
            print(json.dumps(row), flush=True)
            del captured[layer]
        recall_rows = [r for r in rows if r["setting"].startswith("recall_layer")]
        means = {key: sum(r[key] for r in recall_rows) / len(recall_rows) for key in recall_rows[0] if key != "setting"}
        rows.append(dict(setting="recall_mean", **means))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gates=args.gates, length=args.length, tail=args.tail, density=args.density,
                           ppl_dense=math.exp(float(dense.mean())), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

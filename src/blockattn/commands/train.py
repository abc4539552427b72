import argparse
import json
import os

HELP = "train a trainable selector's experiment here (landmark, dma, seer, sparsifiner); table, JSON and a PNG"

ANALYSES = ("icl_regression", "softpag", "softpag_text")  # blockattn.analysis experiments: each module's experiment() and table()
NAMES = ("landmark", "dma", "seer", "sparsifiner") + ANALYSES
TINY = {"landmark": dict(steps=3, batch=4, eval_sequences=20),
        "dma": dict(steps=3, batch=8, train_examples=100, test_examples=50, seq_len=32, vocab=64, num_kv_pairs=2),
        "seer": dict(steps=3, length=256, train_windows=1, eval_windows=1),
        "sparsifiner": dict(train_images=16, test_images=8, teacher_epochs=1, recon_epochs=3, finetune_epochs=1,
                            batch=8)}


def add_arguments(parser):
    parser.add_argument("name", choices=NAMES, help="landmark: block retrieval task; dma: MQAR vs dense and window; "
                                                    "seer: gates distilled on a real model's attention; "
                                                    "sparsifiner: a tiny ViT vs its dense twin; "
                                                    "icl_regression: multi-head softmax attention on in-context "
                                                    "linear regression; softpag: SoftPAG + HeadHunter on a tiny DiT; "
                                                    "softpag_text: the same on SmolLM2-135M (IOI)")
    parser.add_argument("--model", default="smollm2-135m", help="seer: the model whose attention the gates learn")
    parser.add_argument("--layer", type=int, default=15, help="seer: the layer captured")
    parser.add_argument("--layers", default=None,
                        help="seer: several layers, 'all' or a comma list such as 0,15,29 (one gate each; "
                             "the gate file then serves hf.patch on those layers); overrides --layer")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the experiment's)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the experiment's)")
    parser.add_argument("--window", type=int, default=None, help="dma: keys kept per query (default 8)")
    parser.add_argument("--length", type=int, default=None,
                        help="seer: tokens per captured window (default 2048; gates trained at the length they "
                             "serve rank long prompts' block rows better); dma: MQAR sequence length (default 64)")
    parser.add_argument("--pairs", type=int, default=None, help="dma: MQAR key-value pairs (default 4)")
    parser.add_argument("--position-embeddings", action=argparse.BooleanOptionalAction, default=None,
                        help="dma: learned absolute position embeddings in all three models, as in the paper's "
                             "MQAR benchmark (Zoology's max_position_embeddings; default on)")
    parser.add_argument("--windows", type=int, default=None, help="seer: captured training windows (default 12)")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="seer: held-out windows scored at the end (default 4; each costs 12 dense attention "
                             "passes per layer at --length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--tiny", action="store_true", help="a few steps at a tiny size (CI smoke run)")
    parser.add_argument("--out", default="train_out", help="folder for <name>.json and <name>.png")


def _positive(name, value):
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be a positive int, got {value}")


def _layers(spec):
    if spec is None or spec == "all":
        return spec
    try:
        layers = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be 'all' or a comma list of layer indices, got {spec!r}") from None
    if any(i < 0 for i in layers):
        raise ValueError(f"--layers must be non-negative layer indices, got {spec!r}")
    return layers


def _layer_text(layer) -> str:
    if not isinstance(layer, list):
        return f"layer {layer}"
    if layer == list(range(layer[0], layer[-1] + 1)):
        return f"layers {layer[0]}-{layer[-1]} ({len(layer)} gates)"
    return f"layers {', '.join(map(str, layer))}"


def _landmark_table(result) -> str:
    rows = ["| evaluation | blocks read per query | accuracy |", "|---|---|---|"]
    for label, acc in result["accuracy"].items():
        reads = "all earlier + own" if label.startswith("full") else "own" if label.startswith("own") else \
            label.split()[1] + " + own"
        rows.append(f"| {label} | {reads} | {acc:.3f} |")
    top1 = " / ".join(f"{h:.3f}" for h in result["hit_top1"])
    top2 = " / ".join(f"{h:.3f}" for h in result["hit_top2"])
    rows.append(f"\nchance {result['chance']:.3f}; landmark hit rate per layer (some head): top-1 {top1}, "
                f"top-2 {top2}; trained {result['steps']} steps in {result['train_seconds']:.0f} s")
    return "\n".join(rows)


def _dma_table(results) -> str:
    rows = ["| model | keys per query | accuracy | train s |", "|---|---|---|---|"]
    for r in results:
        keys = "all earlier" if r["model"] == "dense" else f"{r['window']}"
        rows.append(f"| {r['model']} | {keys} | {r['accuracy']:.3f} | {r['train_seconds']:.0f} |")
    recall = next(r["mask_recall"] for r in results if r["model"] == "dma")
    rows.append(f"\nshare of the DMA model's unmasked attention mass kept (rows i >= w): DMA mask "
                f"{recall['dma']:.3f}, random {recall['random']:.3f}, last-w window {recall['window']:.3f}")
    return "\n".join(rows)


def _seer_table(result) -> str:
    rows = ["| density | selector | attention recall | output rel. error | block KL | measured density |",
            "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rows.append(f"| {r['density']} | {r['selector']} | {r['recall']:.3f} | {r['output_error']:.3f} | "
                    f"{r['block_kl']:.4f} | {r['measured_density']:.3f} |")
    if len(result.get("per_layer", {})) > 1:
        rows.append(f"\nmeans over the {len(result['per_layer'])} layers; trained-gate recall per layer at density "
                    f"0.25: " + ", ".join(f"{i}: {d[0.25]:.2f}" for i, d in sorted(result["per_layer"].items())))
    per = " per layer" if isinstance(result["layer"], list) else ""
    rows.append(f"\n{result['model']} {_layer_text(result['layer'])}, L = {result['length']}, {result['train_windows']} "
                f"training / {result['eval_windows']} held-out windows; capture {result['capture_seconds']:.0f} s, "
                f"{result['steps']} gate steps{per} in {result['train_seconds']:.0f} s")
    return "\n".join(rows)


def _plot_seer(result, path):
    from blockattn.plots import figure, save

    fig, axes = figure(1, 2, figsize=(10, 3.6))
    left, right = axes[0]
    left.plot(result["losses"])
    left.set_xlabel("step")
    left.set_ylabel("distillation loss (10 x KL)")
    for selector in dict.fromkeys(r["selector"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["selector"] == selector]
        right.plot([r["density"] for r in rows], [r["recall"] for r in rows], marker="o", label=selector)
    right.set_xlabel("target density")
    right.set_ylabel("attention recall (held out)")
    right.legend(fontsize=8)
    fig.suptitle(f"blockattn train seer: {result['model']} {_layer_text(result['layer'])}"
                 + (" (loss and recall: means over the layers)" if isinstance(result["layer"], list) else ""))
    return save(fig, path)


def _plot(name, results, path):
    from blockattn.plots import figure, save

    fig, axes = figure(1, 2, figsize=(10, 3.6))
    left, right = axes[0]
    runs = results if isinstance(results, list) else [dict(results, model=name)]
    for r in runs:
        losses = r["losses"]
        smooth = max(1, len(losses) // 50)
        curve = [sum(losses[i:i + smooth]) / len(losses[i:i + smooth]) for i in range(0, len(losses), smooth)]
        left.plot([i * smooth for i in range(len(curve))], curve, label=r["model"])
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend()
    if isinstance(results, list):
        labels, values = [r["model"] for r in results], [r["accuracy"] for r in results]
    else:
        labels, values = list(results["accuracy"]), list(results["accuracy"].values())
        right.axhline(results["chance"], color="grey", linestyle=":", label="chance")
        right.legend()
    right.bar(range(len(values)), values)
    right.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1)
    fig.suptitle(f"blockattn train {name}")
    return save(fig, path)


def _sparsifiner_table(result) -> str:
    rows = ["| model | keys per patch query | test accuracy |", "|---|---|---|"]
    keys, tokens = result["keys_per_row"], result["tokens"]
    for label, name, k in (("dense teacher (twin)", "teacher_accuracy", tokens),
                           ("Sparsifiner after phase 1 (predictor only)", "recon_accuracy", keys),
                           ("Sparsifiner after phase 2 (backbone tuned)", "student_accuracy", keys)):
        rows.append(f"| {label} | {k} of {tokens} | {result[name]:.3f} |")
    rows += ["", "| masks of the same size | recall of the dense attention mass (after phase 1) | (after phase 2) |",
             "|---|---|---|"]
    for name in ("predicted", "random", "window"):
        rows.append(f"| {name} | {result['recall_after_recon'][name]:.3f} | {result['recall'][name]:.3f} |")
    seconds = result["seconds"]
    rows.append(f"\nmean Jaccard of two images' predicted masks {result['recall']['jaccard']:.3f}; train s: teacher "
                f"{seconds['teacher']:.0f}, phase 1 {seconds['recon']:.0f}, phase 2 {seconds['finetune']:.0f}")
    return "\n".join(rows)


def _plot_sparsifiner(result, path):
    from blockattn.plots import figure, save

    fig, axes = figure(1, 3, figsize=(13, 3.6))
    left, middle, right = axes[0]
    at = 0
    for phase, losses in result["losses"].items():
        left.plot(range(at, at + len(losses)), losses, label=phase)
        at += len(losses)
    left.set_xlabel("step")
    left.set_ylabel("loss (per phase)")
    left.set_yscale("log")
    left.legend()
    labels = ["dense teacher", "after phase 1", "after phase 2"]
    middle.bar(range(3), [result[k] for k in ("teacher_accuracy", "recon_accuracy", "student_accuracy")])
    middle.set_xticks(range(3), labels, rotation=15, fontsize=8)
    middle.set_ylim(0, 1)
    middle.set_ylabel(f"test accuracy ({result['keys_per_row']} of {result['tokens']} keys)")
    names = ["predicted", "random", "window"]
    right.bar(range(3), [result["recall"][n] for n in names])
    right.set_xticks(range(3), names, fontsize=8)
    right.set_ylim(0, 1)
    right.set_ylabel("dense attention mass recalled")
    fig.suptitle("blockattn train sparsifiner: tiny ViT, 25% connectivity")
    return save(fig, path)


def _run_analysis(args):
    import importlib

    from tqdm import tqdm

    module = importlib.import_module(f"blockattn.analysis.{args.name}")
    bars = []

    def progress_factory(name):
        bars.append(tqdm(desc=f"{args.name}: {name}", unit="step"))

        def progress(step, total, loss):
            bars[-1].total = total
            bars[-1].set_postfix(loss=f"{loss:.3f}")
            bars[-1].update(1)
            if step == total:
                bars[-1].close()
        return progress
    result = module.experiment(steps=args.steps, batch=args.batch, seed=args.seed, tiny=args.tiny, out=args.out,
                               progress_factory=progress_factory)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "losses"}, f, indent=1)
    print(module.table(result))
    print("plots: " + ", ".join(result["plots"]))


def run(args):
    import torch
    from tqdm import tqdm

    _positive("steps", args.steps)
    _positive("batch", args.batch)
    _positive("threads", args.threads)
    _positive("window", args.window)
    if args.window is not None and args.name != "dma":
        raise ValueError("--window applies to dma only")
    _positive("length", args.length)
    _positive("windows", args.windows)
    _positive("eval-windows", args.eval_windows)
    _positive("pairs", args.pairs)
    if (args.windows is not None or args.eval_windows is not None) and args.name != "seer":
        raise ValueError("--windows and --eval-windows apply to seer only")
    if args.length is not None and args.name not in ("seer", "dma"):
        raise ValueError("--length applies to seer and dma only")
    if (args.pairs is not None or args.position_embeddings is not None) and args.name != "dma":
        raise ValueError("--pairs and --position-embeddings apply to dma only")
    if args.name == "seer" and args.batch is not None:
        raise ValueError("--batch does not apply to seer (one captured window per step)")
    torch.set_num_threads(args.threads)
    if args.name in ANALYSES:
        return _run_analysis(args)
    options = dict(TINY[args.name]) if args.tiny else {}
    options.update({k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("window", args.window),
                                      ("length", args.length), ("train_windows", args.windows),
                                      ("eval_windows", args.eval_windows)) if v is not None})
    if args.name == "sparsifiner" and args.steps is not None:
        raise ValueError("--steps does not apply to sparsifiner (it trains by epochs)")
    if args.name == "dma":
        if "length" in options:  # train() then sizes the vocabulary to the length
            options["seq_len"] = options.pop("length")
            options.pop("vocab", None)
        if args.pairs is not None:
            options["num_kv_pairs"] = args.pairs
        if args.position_embeddings is not None:
            options["position_embeddings"] = args.position_embeddings
    options["seed"] = args.seed
    os.makedirs(args.out, exist_ok=True)

    if args.name == "landmark":
        from blockattn.modules.landmark_train import LandmarkTask, train
        if args.tiny:
            options["task"] = LandmarkTask(blocks=4, block_size=8, pairs=2, queries=2)
        with tqdm(desc="landmark", unit="step") as bar:
            def progress(step, total, loss):
                bar.total = total
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
            results = train(progress=progress, **options)
        table = _landmark_table(results)
    elif args.name == "seer":
        from blockattn.modules.seer_gate import save_gates
        from blockattn.modules.seer_train import run as train_seer
        with tqdm(desc="seer gate", unit="step") as bar:
            def progress(step, total, loss):
                bar.total = total
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
            results = train_seer(model_name=args.model, layer=args.layer, layers=_layers(args.layers),
                                 progress=progress, **options)
        gates = results.pop("gates")
        print(f"gates: {save_gates(gates, os.path.join(args.out, 'seer_gates.pt'), model=args.model)}")
        table = _seer_table(results)
    elif args.name == "sparsifiner":
        from blockattn.modules.sparsifiner_train import train as train_sparsifiner
        with tqdm(desc="sparsifiner", unit="step") as bar:
            def progress(phase, step, total, loss):
                if step == 1:
                    bar.reset(total)
                    bar.set_description(f"sparsifiner: {phase}")
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
            results = train_sparsifiner(progress=progress, **options)
        table = _sparsifiner_table(results)
    else:
        from blockattn.modules.dma_train import MODELS, train
        results = []
        for kind in MODELS:
            with tqdm(desc=f"dma: {kind}", unit="step") as bar:
                def progress(step, total, loss):
                    bar.total = total
                    bar.set_postfix(loss=f"{loss:.3f}")
                    bar.update(1)
                results.append(train(kind, progress=progress, **options))
        table = _dma_table(results)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table)
    plot = {"seer": _plot_seer, "sparsifiner": _plot_sparsifiner}.get(args.name, lambda r, p: _plot(args.name, r, p))
    print(f"plot: {plot(results, os.path.join(args.out, f'{args.name}.png'))}")

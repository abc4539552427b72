"""`blockattn eval`: does the model still answer with a method, and is it faster? Passkey retrieval on
SmolLM2 (or any local model) at several lengths and depths for dense and every registered method."""
HELP = ("end-to-end: does a model patched with each method still do the task, and is its prefill faster? "
        "Passkey retrieval (and the other --tasks) on a real model (SmolLM2 by default) for dense and every "
        "registered method: table, results.json, a needle heatmap PNG per method and a speed/quality Pareto "
        "PNG. For layer-level recall and selection cost on captured q/k/v, see `compare`")

TASKS = ("passkey", "multi_needle", "retrieval_prose", "perplexity", "encoder")
# the default run tries dense, then the LLM-prefill selectors and baselines, then every other method
FIRST = ("xattention", "streaming", "vertical_slash", "hip", "moba", "a_shape", "sliding_window")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
QUICK = {"lengths": [1024], "depths": [0.1, 0.5, 0.9], "methods": ["dense", "streaming:window=256"]}


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in model name (smollm2-135m, gemma3-270m: 32k context, sliding + full layers) "
                             "or a local Hugging Face model directory")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                        help="parameter dtype (default fp32; bf16 halves memory and is the long-context setting)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="method specs 'name' or 'name:key=value,...' (default: dense and every registered "
                             "method)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths in tokens (default 2048 4096 8000: prompt + answer must fit "
                             "the model's context, 8192 for SmolLM2; 8192 16384 32000 for a 32k model)")
    parser.add_argument("--depths", type=float, nargs="+", default=None,
                        help="needle depths in [0, 1] (default 0 .25 .5 .75 1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="passkey seeds (one sample per seed)")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "perplexity"], choices=TASKS,
                        help="passkey (length x depth heatmap), multi_needle (4 facts, each asked), retrieval_prose "
                             "(4 'access code' facts in real documentation prose, the one at each depth asked: "
                             "harder than passkey's repeated filler), perplexity "
                             "(the last 1024 tokens of real text at each length vs the unpatched model), encoder "
                             "(MiniLM embedding cosine vs dense; loads minilm-l6). Default: passkey perplexity")
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: lengths {QUICK['lengths']}, depths {QUICK['depths']}, "
                             f"methods {QUICK['methods']} (each overridable)")
    parser.add_argument("--budget", type=float, default=15.0, metavar="MINUTES",
                        help="time budget: methods that would finish past it are listed as not run (dense "
                             "always runs; 0 = no budget, run every method). Default 15")
    parser.add_argument("--backend", default="auto", help="engine backend (default auto)")
    parser.add_argument("-o", "--output", default="eval_results",
                        help="folder for results.json, table.md and the PNGs (default ./eval_results)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--kv", nargs="+", default=None, metavar="POLICY",
                        help="evaluate KV-cache policies instead of prefill methods: specs 'name' or "
                             "'name:key=value,...' (razor, tidaldecode, moa, act, streaming, snapkv, tova, knorm); "
                             "accuracy vs compression ratio, KV bytes held, RSS added, time to first token, decode "
                             "tokens/s, kv_table.md, kv_results.json and kv_accuracy.png (tasks passkey and "
                             "multi_needle; default length 4096, depths .1 .5 .9)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7, 0.9],
                        help="with --kv: fractions of the cache removed, for each policy whose spec sets no ratio "
                             "(default 0.5 0.7 0.9)")
    parser.add_argument("--method", default=None,
                        help="with --kv: the prefill method spec (default dense)")


def default_methods() -> list[str]:
    """dense, then every training-free method that can serve a causal LM (grid-only and bidirectional-only
    ones are left out of the default run; named explicitly they are refused with the reason)."""
    from blockattn import methods as registry
    names = [n for n in registry.training_free() if n != "dense"]
    serving = [n for n in names if True in registry.get(n).causal_modes and not registry.get(n).needs_grid]
    return ["dense"] + [n for n in FIRST if n in serving] + [n for n in serving if n not in FIRST]


def run(args):
    import json
    import os
    import time

    from blockattn import methods as registry
    from blockattn import models
    from blockattn.bench import eval_plots, harness

    if getattr(args, "kv", None):
        from blockattn.bench.kv_eval import main
        return main(args)
    quick = getattr(args, "quick", False)
    specs = args.methods or (QUICK["methods"] if quick else default_methods())
    if args.budget < 0:
        raise ValueError(f"--budget must be >= 0 minutes, got {args.budget}")
    parsed = [harness.parse_method(s) for s in specs]  # fail on bad names/params before loading the model
    config = harness.EvalConfig(backend=args.backend, seeds=tuple(args.seeds), tasks=tuple(args.tasks),
                                budget_seconds=args.budget * 60 or None)
    if quick:
        config.lengths, config.depths = tuple(QUICK["lengths"]), tuple(QUICK["depths"])
        config.quality_layers, config.decode_prompt = (0, 15, 29), 128
    if args.lengths:
        config.lengths = tuple(args.lengths)
    if args.depths:
        config.depths = tuple(args.depths)

    import torch
    start = time.perf_counter()
    model, tokenizer = models.load(args.model, dtype=getattr(torch, DTYPES[getattr(args, "dtype", "fp32")]))
    if "ForCausalLM" not in type(model).__name__:
        raise ValueError(f"blockattn eval needs a causal language model; {args.model!r} loads as "
                         f"{type(model).__name__}")
    encoder = models.load("minilm-l6") if "encoder" in config.tasks else None
    results = harness.run_eval(model, tokenizer, parsed, config, progress=not args.no_progress, encoder=encoder)
    results["model"] = str(args.model)
    results["wall_seconds"] = time.perf_counter() - start
    os.makedirs(args.output, exist_ok=True)
    table = harness.format_table(results) + "\n\nPer length:\n\n" + harness.format_length_table(results)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(args.output, "table.md"), "w") as f:
        f.write(table + "\n")
    paths = eval_plots.heatmaps(results, args.output)
    paths.append(eval_plots.pareto(results, os.path.join(args.output, "pareto.png")))
    print(table)
    print(f"\nwall time {results['wall_seconds']:.0f} s; wrote {os.path.join(args.output, 'results.json')}, "
          f"table.md and {len(paths)} PNGs under {args.output}")
    return 0

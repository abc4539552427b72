"""`blockattn circuits --model smollm2-135m [--task ioi|colored_objects|both] [--out DIR] [--path-patching]
[--formats]`"""
HELP = ("SAE circuit identification (O'Neill & Bui 2024) on IOI / colored objects: head rankings, the "
        "mean-ablation check (top-k vs random k heads), and with --task both the circuit overlap and the "
        "mid-layer intervention (Merullo et al. 2024); PNG heatmaps and bar chart in --out")


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m", help="model name or local folder (blockattn.models.load)")
    parser.add_argument("--task", choices=["ioi", "colored_objects", "both"], default="both")
    parser.add_argument("--out", default=None, help="folder for the PNGs and results.json")
    parser.add_argument("--n", type=int, default=250,
                        help="positives and negatives coded per task (the official IOI data: 250 + 250)")
    parser.add_argument("--held-out", type=int, default=100, help="fresh prompts for the ablation check")
    parser.add_argument("--position", choices=["mean", "last"], default="mean",
                        help="head results averaged over positions (official) or at the last position")
    parser.add_argument("--filter-correct", action="store_true",
                        help="positives: only prompts the model solves (not the official rule)")
    parser.add_argument("--balanced", action="store_true",
                        help="train the SAE on 5 positives + 5 negatives (official: 10 drawn from the whole set)")
    parser.add_argument("--normalise", action="store_true", help="node score |U+| / |all codes| (official: off)")
    parser.add_argument("--colored-format", default="answer", help="colored-objects wording (circuits.COLOR_FORMATS)")
    parser.add_argument("--colored-shots", type=int, default=3, help="solved colored-objects examples in front")
    parser.add_argument("--colored-count", type=int, default=3, help="colored objects per question")
    parser.add_argument("--path-patching", action="store_true",
                        help="instead of the SAE: Wang et al.'s path patching (heads -> logits, heads -> movers' "
                             "queries), its ablation check, and with --task both the overlap and the transfer")
    parser.add_argument("--pp-n", type=int, default=40, help="clean/corrupted prompt pairs for path patching")
    parser.add_argument("--pp-fraction", type=float, default=0.02, help="top fraction of heads per stage")
    parser.add_argument("--formats", action="store_true",
                        help="only measure the colored-objects accuracy of every wording x shots x count tried")
    parser.add_argument("--formats-only", nargs="+", default=None, help="with --formats: these wordings only")
    parser.add_argument("--trials", type=int, default=1, help="SAE trainings averaged (the official code: 1)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10],
                        help="fractions of heads ablated (top-k and random k)")
    parser.add_argument("--draws", type=int, default=3, help="random head sets per k")
    parser.add_argument("--overlap", type=float, default=0.10, help="top fraction of heads forming a circuit")
    parser.add_argument("--top", type=int, default=15, help="heads listed per task")
    parser.add_argument("--ablate-at", choices=["all", "last"], default="all",
                        help="mean-ablate at every position (all-position means) or at the last one only")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the ablation check on a direct-logit-attribution ranking (not the paper's)")
    parser.add_argument("--seed", type=int, default=0)


def run(args):
    import time

    from blockattn import models

    start = time.perf_counter()

    def progress(line):
        import sys
        print(f"[{time.perf_counter() - start:7.1f} s] {line}", file=sys.stderr, flush=True)

    model, tokenizer = models.load(args.model)
    colored = dict(fmt=args.colored_format, shots=args.colored_shots, count=args.colored_count)
    if args.formats:
        return _formats(model, tokenizer, args)
    if args.path_patching:
        return _path_patching(model, tokenizer, args, colored, progress)
    return _sae(model, tokenizer, args, colored, progress)


def _formats(model, tokenizer, args):
    from blockattn.analysis import circuits

    tried = [("answer", 3, 3), ("answer", 8, 3), ("qa", 3, 3), ("qa", 8, 3), ("statement", 0, 3),
             ("statement", 3, 3), ("color_of", 3, 3), ("statement", 3, 2), ("answer", 3, 2), ("is_list", 0, 3),
             ("is_list", 3, 3)]
    if args.formats_only:
        tried = [t for t in tried if t[0] in args.formats_only]
    print(f"{'format':<10} {'shots':>5} {'objects':>7}  {'accuracy':>8}  {'chance':>6}  {'top-1':>5}  {'logit diff':>10}")
    for fmt, shots, count in tried:
        prompts = circuits.colored_objects_prompts(args.held_out, seed=args.seed + 1, fmt=fmt, shots=shots, count=count)
        m = circuits.task_metrics(circuits.last_logits(model, tokenizer, prompts), tokenizer, prompts)
        print(f"{fmt:<10} {shots:>5} {count:>7}  {m['accuracy']:8.3f}  {1 / count:6.3f}  {m['top1']:5.2f}  "
              f"{m['logit_diff']:10.3f}", flush=True)


def _pairs(task, n, seed, colored):
    from blockattn.analysis import circuits

    if task == "ioi":
        clean, _, abc = circuits.ioi_dataset(n, seed=seed)
        return clean, abc
    return (circuits.colored_objects_prompts(n, seed=seed, **colored),
            circuits.colored_objects_prompts(n, seed=seed, corrupt=True, **colored))


def _print_check(rows):
    print(f"{'ranking':<16} {'condition':<10} {'k':>3}  {'logit diff':>10}  {'accuracy':>8}  {'top-1':>5}")
    for r in rows:
        print(f"{r['ranking']:<16} {r['condition']:<10} {r['k']:>3}  {r['logit_diff']:10.3f}  "
              f"{r['accuracy']:8.3f}  {r['top1']:5.2f}")


def _path_patching(model, tokenizer, args, colored, progress):
    import json
    import os
    import random

    import torch

    from blockattn.analysis import circuit_reuse, circuits, path_patching

    layers = len(model.model.layers)
    tasks = ["ioi", "colored_objects"] if args.task == "both" else [args.task]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    found, saved = {}, {}
    for task in tasks:
        clean, corrupt = _pairs(task, args.pp_n, args.seed, colored)
        c = found[task] = path_patching.staged_circuit(model, tokenizer, clean, corrupt, fraction=args.pp_fraction,
                                                       progress=lambda line: progress(f"{task}: {line}"))
        total = c["logits"].numel()
        print(f"\n== {task}: path patching on {len(clean)} clean/corrupted pairs; logit diff clean "
              f"{c['clean_logit_diff']:.3f}, corrupted {c['corrupt_logit_diff']:.3f}")
        for name, scores in (("heads -> logits", c["logits"]), ("heads -> movers' queries", c["queries"])):
            order = path_patching.ranking(scores).order[:8]
            print(f"{name}: most negative " + ", ".join(f"{l}.{h} {float(scores[l, h]):+.3f}" for l, h in order))
            pos = path_patching.ranking(scores, sign=1).order[:3]
            print(f"{'':>{len(name)}}  most positive " + ", ".join(f"{l}.{h} {float(scores[l, h]):+.3f}" for l, h in pos))
        print(f"movers (stage-1 top {100 * args.pp_fraction:g}%): {c['movers']}")
        print(f"circuit (union of each stage's top {100 * args.pp_fraction:g}% by |score|): {c['circuit']}")
        test, _ = _pairs(task, args.held_out, args.seed + 1, colored)
        means = circuits.last_position_means(model, tokenizer, corrupt, every_position=True)
        ks = sorted({max(1, round(f * total)) for f in args.fractions})
        rows = [dict(r, ranking="path patching") for r in
                circuits.ablation_check(model, tokenizer, c["combined"], test, means, ks=ks, draws=args.draws,
                                        seed=args.seed, every_position=True)]
        progress(f"{task}: ablation check done")
        print(f"mean-ablation (corrupted prompts' all-position means) at every position, {len(test)} held-out prompts, "
              f"ranking = each head's most negative stage score:")
        _print_check(rows)
        saved[task] = dict(logits=c["logits"].tolist(), queries=c["queries"].tolist(), movers=c["movers"],
                           circuit=c["circuit"], clean_logit_diff=c["clean_logit_diff"],
                           corrupt_logit_diff=c["corrupt_logit_diff"], ablation=rows, held_out=len(test), pairs=len(clean))
        found[task]["held_out"] = test
        if args.out:
            for name in ("logits", "queries"):
                circuits.plot_scores(c[name], os.path.join(args.out, f"path_patching_{task}_{name}.png"),
                                     title=f"{args.model} {task}: path patching heads -> {name}",
                                     label="(LD patched - LD clean) / (LD clean - LD corrupted)")
    if len(tasks) == 2:
        ioi, col = found["ioi"], found["colored_objects"]
        n_heads = ioi["logits"].numel()
        o = circuit_reuse.overlap(ioi["circuit"], col["circuit"])
        print(f"\n== overlap of the path-patching circuits ({len(ioi['circuit'])} IOI / {len(col['circuit'])} colored "
              f"heads): |A n B| {o['intersection']} (chance {len(ioi['circuit']) * len(col['circuit']) / n_heads:.2f}), "
              f"Jaccard {o['jaccard']:.3f}, |A n B|/|A| {o['of_a']:.3f}; shared "
              f"{sorted(set(ioi['circuit']) & set(col['circuit']))}")
        k = max(1, round(args.overlap * n_heads))
        o10 = circuit_reuse.overlap(ioi["combined"].top(k), col["combined"].top(k))
        print(f"overlap of the top {100 * args.overlap:g}% ({k}) by combined score: |A n B| {o10['intersection']} "
              f"(chance {circuit_reuse.chance_overlap(k, n_heads):.1f}), Jaccard {o10['jaccard']:.3f}")
        inhibition = path_patching.top_heads(ioi["queries"], 4 / n_heads)
        rng = random.Random(args.seed)
        others = [(l, h) for l in range(layers) for h in range(ioi["logits"].shape[1]) if (l, h) not in inhibition]
        controls = [rng.sample(others, len(inhibition)) for _ in range(args.draws)]
        test = col["held_out"]
        rows = [dict(condition="none", heads=[], **circuits.task_metrics(
            circuits.last_logits(model, tokenizer, test), tokenizer, test))]
        rows.append(dict(condition="IOI inhibition heads -> wrong colors", heads=inhibition,
                         **circuit_reuse.attend_to_foils(model, tokenizer, inhibition, test)))
        for i, heads in enumerate(controls):
            rows.append(dict(condition=f"random heads {i + 1} -> wrong colors", heads=heads,
                             **circuit_reuse.attend_to_foils(model, tokenizer, heads, test)))
        print(f"transfer: {len(test)} held-out colored-objects prompts; the 4 IOI heads with the most negative "
              f"heads -> movers' queries score {inhibition} attend at the last position to the wrong colors:")
        print(f"{'condition':<38} {'logit diff':>10}  {'accuracy':>8}  {'top-1':>5}")
        for r in rows:
            print(f"{r['condition']:<38} {r['logit_diff']:10.3f}  {r['accuracy']:8.3f}  {r['top1']:5.2f}")
        saved["overlap"] = dict(circuit=o, top=dict(k=k, **o10), transfer=rows)
    if args.out:
        with open(os.path.join(args.out, "path_patching_results.json"), "w") as f:
            json.dump(saved, f, indent=1, default=lambda x: x.tolist() if isinstance(x, torch.Tensor) else str(x))
        print(f"wrote {args.out}/path_patching_*.png and path_patching_results.json")
    progress("done")


def _sae(model, tokenizer, args, colored, progress):
    import json
    import os

    import torch

    from blockattn.analysis import circuit_reuse, circuits

    layers = len(model.model.layers)
    tasks = ["ioi", "colored_objects"] if args.task == "both" else [args.task]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    found, checks, saved = {}, {}, {}
    for task in tasks:
        c = found[task] = circuits.find_circuit(model, tokenizer, task, n=args.n, held_out=args.held_out,
                                                trials=args.trials, seed=args.seed, position=args.position,
                                                filter_correct=args.filter_correct, balanced=args.balanced,
                                                colored=colored, normalise=args.normalise, progress=progress)
        scores, total = c["ranking"].scores, c["ranking"].scores.numel()
        g = c["generated"]
        print(f"\n== {task}: {args.model}, {layers} layers x {scores.shape[1]} heads; generated prompts right "
              f"{c['solved']}/{c['tried']} (logit diff {g['logit_diff']:.2f}, top-1 {g['top1']:.2f}); SAE on "
              f"{circuits.EXAMPLES} examples, codes on {len(c['positives'])}+{len(c['negatives'])}, results at "
              f"position {args.position!r}, {args.trials} trial(s)")
        print(f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'|U+|':>6}")
        for rank, (layer, head) in enumerate(c["ranking"].top(args.top), 1):
            print(f"{rank:>4}  {layer:>5}  {head:>4}  {float(scores[layer, head]):6.2f}")
        ks = sorted({max(1, round(f * total)) for f in args.fractions})
        every = args.ablate_at == "all"
        means = c["means_all"] if every else c["means"]
        rankings = [("SAE |U+|", c["ranking"])] + ([("DLA baseline", c["baseline"])] if args.baseline else [])
        rows = []
        for label, ranking in rankings:
            if label != "SAE |U+|":
                print(f"{label}: top {args.top // 3}: {ranking.top(args.top // 3)}")
            part = circuits.ablation_check(model, tokenizer, ranking, c["held_out"], means, ks=ks, draws=args.draws,
                                           seed=args.seed, every_position=every)
            rows += [dict(r, ranking=label) for r in part if label == "SAE |U+|" or r["k"]]
            progress(f"{task}: ablation check on the {label} ranking done")
        checks[task] = rows
        print(f"mean-ablation at {'every position' if every else 'the last position'}, {len(c['held_out'])} held-out "
              f"prompts (means over the negatives):")
        _print_check(rows)
        saved[task] = dict(scores=scores.tolist(), order=c["ranking"].order, solved=c["solved"], tried=c["tried"],
                           generated=g, ablation=rows)
        if args.out:
            circuits.plot_scores(scores, os.path.join(args.out, f"circuits_{task}_scores.png"),
                                 title=f"{args.model} {task}: SAE node scores |U+| ({args.trials} trial(s))")
    if len(tasks) == 2:
        ioi, col = found["ioi"], found["colored_objects"]
        k = max(1, round(args.overlap * ioi["ranking"].scores.numel()))
        n_heads = ioi["ranking"].scores.numel()
        o = circuit_reuse.overlap(ioi["ranking"].top(k), col["ranking"].top(k))
        print(f"\n== overlap of the top {100 * args.overlap:.0f}% ({k} heads): |A n B| {o['intersection']} "
              f"(chance {circuit_reuse.chance_overlap(k, n_heads):.1f}), Jaccard {o['jaccard']:.3f}, "
              f"|A n B|/|A| {o['of_a']:.3f}")
        shared = circuit_reuse.shared_mid_heads(ioi["ranking"], col["ranking"], k, layers)
        print(f"shared heads: {sorted(set(ioi['ranking'].top(k)) & set(col['ranking'].top(k)))}")
        print(f"shared mid-layer heads edited: {shared}")
        saved["overlap"] = dict(k=k, **o, shared_mid=shared)
        if shared:
            ioi_pos = circuits.last_position_means(model, tokenizer, ioi["positives"])
            rows = circuit_reuse.intervention(model, tokenizer, shared, col["held_out"], colored_means=col["means"],
                                              ioi_positive_means=ioi_pos, ioi_negative_means=ioi["means"])
            print(f"colored objects, {len(col['held_out'])} held-out prompts, shared mid-layer heads edited at "
                  f"the last position:")
            print(f"{'condition':<14} {'logit diff':>10}  {'accuracy':>8}  {'top-1':>5}")
            for r in rows:
                print(f"{r['condition']:<14} {r['logit_diff']:10.3f}  {r['accuracy']:8.3f}  {r['top1']:5.2f}")
            saved["intervention"] = rows
    if args.out:
        circuits.plot_ablation(checks, os.path.join(args.out, "circuits_ablation.png"), metric="logit_diff")
        with open(os.path.join(args.out, "circuits_results.json"), "w") as f:
            json.dump(saved, f, indent=1, default=lambda x: x.tolist() if isinstance(x, torch.Tensor) else str(x))
        print(f"wrote {args.out}/circuits_*.png and circuits_results.json")
    progress("done")

"""`blockattn circuits --model smollm2-135m [--task ioi|colored_objects|both] [--out DIR]`"""
HELP = ("SAE circuit identification (O'Neill & Bui 2024) on IOI / colored objects: head rankings, the "
        "mean-ablation check (top-k vs random k heads), and with --task both the circuit overlap and the "
        "mid-layer intervention (Merullo et al. 2024); PNG heatmaps and bar chart in --out")


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m", help="model name or local folder (blockattn.models.load)")
    parser.add_argument("--task", choices=["ioi", "colored_objects", "both"], default="both")
    parser.add_argument("--out", default=None, help="folder for the PNGs and results.json")
    parser.add_argument("--n", type=int, default=20, help="positives and negatives coded per task")
    parser.add_argument("--held-out", type=int, default=40, help="fresh prompts for the ablation check")
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
    import json
    import os
    import sys
    import time

    import torch

    from blockattn import models
    from blockattn.analysis import circuit_reuse, circuits

    start = time.perf_counter()

    def progress(line):
        print(f"[{time.perf_counter() - start:7.1f} s] {line}", file=sys.stderr, flush=True)

    model, tokenizer = models.load(args.model)
    layers = len(model.model.layers)
    tasks = ["ioi", "colored_objects"] if args.task == "both" else [args.task]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    found, checks, saved = {}, {}, {}
    for task in tasks:
        c = found[task] = circuits.find_circuit(model, tokenizer, task, n=args.n, held_out=args.held_out,
                                                trials=args.trials, seed=args.seed, progress=progress)
        scores, total = c["ranking"].scores, c["ranking"].scores.numel()
        g = c["generated"]
        print(f"\n== {task}: {args.model}, {layers} layers x {scores.shape[1]} heads; generated prompts right "
              f"{c['solved']}/{c['tried']} (logit diff {g['logit_diff']:.2f}, top-1 {g['top1']:.2f}); SAE on "
              f"{circuits.EXAMPLES} examples, codes on {len(c['positives'])}+{len(c['negatives'])}, "
              f"{args.trials} trial(s)")
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
        print(f"{'ranking':<13} {'condition':<10} {'k':>3}  {'logit diff':>10}  {'accuracy':>8}  {'top-1':>5}")
        for r in rows:
            print(f"{r['ranking']:<13} {r['condition']:<10} {r['k']:>3}  {r['logit_diff']:10.3f}  "
                  f"{r['accuracy']:8.3f}  {r['top1']:5.2f}")
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

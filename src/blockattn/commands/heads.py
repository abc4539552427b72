"""`blockattn heads --model smollm2-135m [--lengths 1000 2000] [--out heads.png] [--mask-check]`"""
HELP = ("retrieval heads (Wu et al. 2024): per-head retrieval scores on needle prompts, the top heads, a "
        "layer x head heatmap, and optionally the masking check (top heads vs random heads)")


def add_arguments(parser):
    parser.add_argument("--model", default="smollm2-135m", help="model name or local folder (blockattn.models.load)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=int, default=10, help="needle depths spread over 0-100%% (the paper's 10)")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="decode limit per sample (the paper's 50)")
    parser.add_argument("--top", type=int, default=20, help="heads listed")
    parser.add_argument("--out", default=None, help="PNG heatmap to write")
    parser.add_argument("--save", default=None, help="write the scores and samples to this JSON file")
    parser.add_argument("--scores", default=None, help="read scores from a JSON file written by --save instead of "
                                                       "measuring them")
    parser.add_argument("--mask-check", action="store_true",
                        help="mask the top heads vs as many random non-retrieval heads; passkey and multi-needle "
                             "accuracy")
    parser.add_argument("--mask-lengths", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--mask-depths", type=int, nargs="+", default=[10, 30, 50, 70, 90])
    parser.add_argument("--fraction", type=float, default=0.05, help="fraction of heads masked (the top ones)")
    parser.add_argument("--draws", type=int, default=3, help="random head sets drawn")
    parser.add_argument("--quiet", action="store_true", help="no per-sample progress lines")


def run(args):
    import json
    import sys
    import time

    import torch

    from blockattn import models
    from blockattn.analysis import retrieval

    model, tokenizer = models.load(args.model)
    start = time.perf_counter()

    def progress(sample):
        if not args.quiet:
            shown = {k: v for k, v in sample.items() if k != "span"}
            print(f"[{time.perf_counter() - start:7.1f} s] {shown}", file=sys.stderr, flush=True)

    if args.scores:
        with open(args.scores) as f:
            saved = json.load(f)
        result = retrieval.RetrievalResult(torch.tensor(saved["scores"]), saved.get("samples", []))
    else:
        result = retrieval.retrieval_search(model, tokenizer, lengths=args.lengths, depths=args.depths,
                                            max_new_tokens=args.max_new_tokens, progress=progress)
    scores = result.scores
    layers, heads = scores.shape
    found = result.retrieval_heads()
    print(f"{args.model}: {layers} layers x {heads} query heads; samples counted {result.counted}/"
          f"{len(result.samples)}; heads with score > {retrieval.THRESHOLD}: {len(found)} "
          f"({100 * len(found) / scores.numel():.1f}%)")
    print(f"{'rank':>4}  {'layer':>5}  {'head':>4}  {'score':>6}")
    for rank, (layer, head, score) in enumerate(result.top(args.top), 1):
        print(f"{rank:>4}  {layer:>5}  {head:>4}  {score:6.3f}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(dict(model=args.model, lengths=args.lengths, depths=args.depths, scores=scores.tolist(),
                           samples=result.samples), f, indent=1)
        print(f"wrote {args.save}")
    if args.out:
        retrieval.plot_scores(scores, args.out, title=f"{args.model}: retrieval scores, {len(found)}/{scores.numel()} "
                                                      f"heads > {retrieval.THRESHOLD}")
        print(f"wrote {args.out}")
    if args.mask_check:
        check = retrieval.masking_check(model, tokenizer, scores, lengths=args.mask_lengths, depths=args.mask_depths,
                                        fraction=args.fraction, draws=args.draws,
                                        progress=None if args.quiet else progress)
        print(f"masked while decoding the answer: top {len(check['top'])} heads {check['top']}")
        for d, chosen in enumerate(check["random"], 1):
            print(f"random {d}: {chosen}")
        print(f"{'task':<13} {'mode':<8} {'heads masked':<12} {'accuracy':>9}")
        for row in check["rows"]:
            print(f"{row['task']:<13} {row['mode']:<8} {row['condition']:<12} "
                  f"{row['correct']:>3}/{row['total']:<3} {row['correct'] / row['total']:5.2f}")

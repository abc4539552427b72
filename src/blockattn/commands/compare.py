"""`blockattn compare --lengths 4096 -o compare` -> compare_recall.png, compare_speed.png and a table."""
HELP = ("layer-level quality of the selection methods, no generation: on q/k/v captured from SmolLM2 layers "
        "(or random), each method's attention-mass recall, output error vs dense, density and selection time; "
        "Pareto plots and a table. For end-to-end task accuracy and prefill speed on a model, see `eval`")


def add_arguments(parser):
    parser.add_argument("--methods", nargs="+", default=None, help="method names (default: every registered one)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096], help="sequence lengths in tokens")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20, 28], help="SmolLM2 layers to capture")
    parser.add_argument("--random", action="store_true",
                        help="random q/k/v shaped like SmolLM2 (9 query / 3 key heads, D=64) instead of the model")
    parser.add_argument("-o", "--output", required=True,
                        help="path prefix: writes PREFIX_recall.png, PREFIX_speed.png and PREFIX.md")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (best is kept)")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when x should be small and y large, sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(rows, prefix: str) -> list[str]:
    """Recall vs density and speedup vs recall, one marker per (method, length), Pareto fronts drawn."""
    from blockattn.plots import figure, save

    paths = []
    for kind, x_of, x_label, y_of, y_label in (
            ("recall", lambda r: r.density, "density (computed tiles / causal tiles)",
             lambda r: r.recall, "attention-mass recall"),
            ("speed", lambda r: -r.speedup, "speedup over dense attention (selection + sparse attention)",
             lambda r: r.recall, "attention-mass recall")):
        fig, axes = figure(figsize=(7, 5))
        ax = axes[0, 0]
        for length in sorted({r.length for r in rows}):
            group = [r for r in rows if r.length == length]
            points = [(x_of(r), y_of(r)) for r in group]
            xs = [abs(p[0]) for p in points]
            ax.scatter(xs, [p[1] for p in points], label=f"L={length}")
            for r, x, (_, y) in zip(group, xs, points):
                ax.annotate(r.method, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
            front = pareto_front(points)
            ax.plot([xs[i] for i in front], [points[i][1] for i in front], "--", alpha=0.6)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        if kind == "speed":
            ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title("recall vs density" if kind == "recall" else "speed vs quality (dashed: Pareto front)")
        ax.legend()
        paths.append(save(fig, f"{prefix}_{kind}.png"))
    return paths


def run(args):
    import os

    import torch
    from tqdm import tqdm

    import blockattn
    from blockattn.bench.quality import format_table, measure_layers, skip_reason

    names = args.methods or [m for m in blockattn.methods.training_free() if m != "dense"]
    unknown = sorted(set(names) - set(blockattn.methods.names()))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {', '.join(blockattn.methods.names())}")
    if any(length < 1 for length in args.lengths) or args.repeats < 1:
        raise ValueError("--lengths and --repeats must be positive")
    if not args.random:
        from blockattn.bench.capture import capture_qkv, load_smollm2, real_text_ids
        model, tokenizer = load_smollm2()
    rows, skipped = [], []
    for length in args.lengths:
        if args.random:
            g = torch.Generator().manual_seed(length)
            captured = {0: (torch.randn(1, 9, length, 64, generator=g), torch.randn(1, 3, length, 64, generator=g),
                            torch.randn(1, 3, length, 64, generator=g))}
        else:
            captured = capture_qkv(model, real_text_ids(tokenizer, length), layers=args.layers)
        for name in tqdm(names, desc=f"methods @ {length}"):
            first = next(iter(captured))
            reason = skip_reason(name, *captured[first][:2], layer=first)
            if reason:  # e.g. video methods that need grid=(T, H, W)
                skipped.append(f"{name} @ {length}: {reason}")
                continue
            rows.append(measure_layers(name, captured, repeats=args.repeats))
    if not rows:
        raise ValueError("no method could be measured: " + "; ".join(s.strip() for s in skipped))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    table = format_table(rows)
    source = "random q/k/v" if args.random else f"SmolLM2-135M q/k/v, layers {args.layers}, Python docs text"
    with open(f"{args.output}.md", "w") as f:
        f.write(f"{source}; means over layers; timings on a shared machine are noisy.\n\n{table}\n")
        if skipped:
            f.write("\nSkipped:\n" + "".join(f"- {s}\n" for s in skipped))
    print(table)
    for line in skipped:
        print(f"skipped {line}")
    for path in plot(rows, args.output) + [f"{args.output}.md"]:
        print(f"wrote {path}")
    return 0

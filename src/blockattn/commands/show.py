"""`blockattn show PATTERN key=value ... -o mask.png`"""
HELP = "draw a pattern's layout: block matrix per head, plus the token mask when the sizes are small"

# pattern helpers that do not build a layout from plain parameters
_NOT_DRAWABLE = {"neighborhood_ranges", "tiled_permutation", "to_tiled", "from_tiled", "frame_segment_ids",
                 "dual_rope_position_ids", "per_head", "segment_causal"}
_TOKEN_ZOOM_LIMIT = 1 << 22  # draw the token mask up to 2048 x 2048 positions


def drawable_patterns() -> list[str]:
    from blockattn import patterns
    return sorted(n for n in patterns.__all__ if n not in _NOT_DRAWABLE and callable(getattr(patterns, n)))


def add_arguments(parser):
    parser.add_argument("pattern", help="a blockattn.patterns constructor: " + ", ".join(drawable_patterns()))
    parser.add_argument("params", nargs="*", metavar="key=value",
                        help="constructor arguments as Python literals, e.g. grid=(32,32) window=7 block_q=16")
    parser.add_argument("-o", "--output", required=True, help="PNG path to write")
    parser.add_argument("--max-heads", type=int, default=4, help="heads drawn at most")
    parser.add_argument("--title", default=None)


def parse_params(items: list[str]) -> dict:
    import ast

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"parameters must look like key=value, got {item!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value  # a bare word, e.g. a name
    return params


def draw(layout, path: str, *, max_heads: int = 4, title: str | None = None) -> str:
    """Block matrix per head (black: full tile, grey: tile with a token-level mask), and below it
    the token mask of each head when `q_len * k_len` is small enough to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from blockattn.plots import block_picture

    heads = min(layout.heads, max_heads)
    blocks = block_picture(layout)
    zoom = layout.q_len * layout.k_len <= _TOKEN_ZOOM_LIMIT
    rows = 2 if zoom else 1
    fig, axes = plt.subplots(rows, heads, figsize=(max(3.3 * heads, 6.0), 3.4 * rows), squeeze=False)
    tokens = layout.to_token_mask()[0] if zoom else None
    for head in range(heads):
        name = f"head {head}" if layout.heads > 1 else "all heads"
        ax = axes[0, head]
        ax.imshow(blocks[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}: blocks {layout.block_q}x{layout.block_k}", fontsize=8)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
        if zoom:
            ax = axes[1, head]
            ax.imshow(tokens[min(head, tokens.shape[0] - 1)].float().numpy(), cmap="Greys", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_title(f"{name}: token mask", fontsize=8)
            ax.set_xlabel("key", fontsize=8)
            ax.set_ylabel("query", fontsize=8)
    fig.suptitle(title or f"q_len={layout.q_len} k_len={layout.k_len}  tiles computed {layout.density():.3f}  "
                 f"token pairs {layout.token_density():.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(args):
    from blockattn import patterns

    if args.pattern not in drawable_patterns():
        print(f"error: unknown pattern {args.pattern!r}; expected one of {', '.join(drawable_patterns())}")
        return 2
    try:
        params = parse_params(args.params)
        layout = getattr(patterns, args.pattern)(**params)
    except (ValueError, TypeError) as error:
        print(f"error: {error}")
        return 2
    draw(layout, args.output, max_heads=args.max_heads, title=args.title)
    print(f"{args.pattern}: {layout!r}\nwrote {args.output}")

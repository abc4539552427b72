"""`blockattn show PATTERN key=value ... -o mask.png`"""
HELP = "draw a pattern's layout: block matrix per head, plus the token mask when the sizes are small"

# pattern helpers that do not build a layout from plain parameters
_NOT_DRAWABLE = {"neighborhood_ranges", "tiled_permutation", "to_tiled", "from_tiled", "frame_segment_ids",
                 "dual_rope_position_ids", "per_head", "segment_causal"}


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
    from blockattn.plots import plot_layout
    return plot_layout(layout, path, max_heads=max_heads, title=title, token_masks=True)


def run(args):
    from blockattn import patterns

    if args.pattern not in drawable_patterns():
        raise ValueError(f"unknown pattern {args.pattern!r}; expected one of {', '.join(drawable_patterns())}")
    layout = getattr(patterns, args.pattern)(**parse_params(args.params))
    draw(layout, args.output, max_heads=args.max_heads, title=args.title)
    print(f"{args.pattern}: {layout!r}\nwrote {args.output}")

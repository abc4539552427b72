HELP = "GNA's analytical simulator: tiles a neighborhood-attention problem computes and its upper-bound speedup"


def add_arguments(parser):
    parser.add_argument("--grid", type=int, nargs="+", required=True, help="token grid, e.g. 64 64")
    parser.add_argument("--window", type=int, nargs="+", required=True, help="one value or one per axis")
    parser.add_argument("--tile", type=int, nargs="+", required=True, help="query tile shape, e.g. 8 8")
    parser.add_argument("--kv-tile", type=int, nargs="+", default=None, help="key tile shape (default: --tile)")
    parser.add_argument("--dilation", type=int, nargs="+", default=[1])
    parser.add_argument("--stride", type=int, nargs="+", default=[1])
    parser.add_argument("--causal", type=int, nargs="+", default=[0], help="0/1, one value or one per axis")


def _axis(values):
    return values[0] if len(values) == 1 else tuple(values)


def run(args):
    from blockattn.patterns.simulator import simulate

    result = simulate(tuple(args.grid), window=_axis(args.window), dilation=_axis(args.dilation),
                      stride=_axis(args.stride), causal=_axis([bool(c) for c in args.causal]),
                      tile_shape=tuple(args.tile), kv_tile_shape=None if args.kv_tile is None else tuple(args.kv_tile))
    print(result.describe())

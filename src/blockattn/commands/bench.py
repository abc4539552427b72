import shlex
import sys

HELP = "time the engine's backends over layout families against SDPA and FlexAttention (same run)"


def add_arguments(parser):
    from blockattn.bench.engine import FAMILIES
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baseline")
    parser.add_argument("--max-portable-len", type=int, default=4096,
                        help="skip the portable torch backend above this length (it is the slow fallback)")
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=None,
                        help="dtypes to time (default: those this CPU has arithmetic units for, e.g. fp32 bf16 "
                             "with AVX512-BF16); each gets a large GEMM of its dtype as the machine's peak")
    parser.add_argument("--gemm-size", type=int, default=4096, help="size of the square GEMM timed as the peak")
    parser.add_argument("--record", default="", metavar="FILE",
                        help="also write the table into this markdown file (e.g. BENCHMARKS.md); default: print only")
    parser.add_argument("--plot", default="", metavar="PNG", help="also draw time vs length into this PNG; "
                        "default: print only")


def run(args):
    from blockattn.bench.engine import format_table, machine_line, plot_rows, run_engine_benchmark
    from blockattn.bench.timing import record_markdown

    from blockattn.bench.machine import native_dtypes

    rows = list(run_engine_benchmark(args.lengths, args.families, args.backends, backward=args.backward,
                                     repeats=args.repeats, flex=not args.no_flex,
                                     max_portable_len=args.max_portable_len, dtypes=args.dtype or native_dtypes(),
                                     gemm_size=args.gemm_size))
    table = format_table(rows)
    print(machine_line())
    print(table)
    if args.plot:
        import os
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        plot_rows(rows, args.plot)
        print(f"plot: {args.plot}")
    if args.record:
        command = "blockattn bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        section = "bench-engine-" + ("fwd-bwd" if args.backward else "fwd")
        body = (f"### Engine, {'forward+backward' if args.backward else 'forward'} ({machine_line()})\n\n"
                f"Command: `{command.strip()}`. Ratios are backend time / baseline time in the same run "
                f"(< 1 means faster); 'of GEMM peak' is the row's GFLOP/s over a {args.gemm_size}^3 GEMM of its dtype; "
                f"min of {args.repeats} runs; peak MiB is sampled RSS growth during one call.\n\n"
                f"{table}\n")
        if args.plot:
            body += f"\n![engine timings]({args.plot})\n"
        record_markdown(args.record, section, body)
        print(f"recorded in {args.record}")

import dataclasses
import json

HELP = "train small 2-layer models with each token mixer on MQAR (Zoology); accuracy table and plot vs d_model"


def add_arguments(parser):
    from blockattn.bench.mqar import DEFAULT_MIXERS, MIXERS, MQARConfig
    defaults = MQARConfig()
    parser.add_argument("--mixers", nargs="+", default=list(DEFAULT_MIXERS),
                        help=f"any of {sorted(MIXERS)} (default: all but the slow Titans/Miras memory mixers)")
    parser.add_argument("--d-models", type=int, nargs="+", default=[16, 32, 64])
    for field in dataclasses.fields(MQARConfig):
        if field.name == "lr":
            parser.add_argument("--lr", type=float, default=defaults.lr,
                                help="AdamW learning rate (default: 1e-2 for d_model <= 32, 3e-3 above)")
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription for these tiny models)")
    parser.add_argument("--json", default="", help="write the results (one dict per run; with --load, the merged files) to this JSON file")
    parser.add_argument("--load", nargs="+", default=[], help="skip training: tabulate/plot these JSON result files")
    parser.add_argument("--plot", default="", help="PNG of accuracy vs d_model per mixer ('' = none)")


def run(args):
    import torch
    from tqdm import tqdm

    from blockattn.bench.mqar import MIXERS, MQARConfig, format_table, plot_accuracy, train_mqar

    unknown = [m for m in args.mixers if m not in MIXERS]
    if unknown:
        raise SystemExit(f"unknown mixers {unknown}; choose from {sorted(MIXERS)}")
    if args.load:
        results = [r for path in args.load for r in json.load(open(path))]
    else:
        torch.set_num_threads(args.threads)
        config = MQARConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MQARConfig)})
        print(f"MQAR settings: {config}")
        steps = config.epochs * (config.train_examples // config.batch_size)
        results = []
        with tqdm(total=steps * len(args.mixers) * len(args.d_models), desc="mqar", unit="step") as bar:
            for d_model in args.d_models:
                for mixer in args.mixers:
                    results.append(train_mqar(mixer, d_model, config, progress=bar))
                    tqdm.write(f"{mixer:>18} d={d_model:<4} acc={results[-1]['accuracy']:.3f} "
                               f"({results[-1]['seconds']:.0f} s)")
    if getattr(args, "json", ""):  # with --load: the merged results
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(format_table(results))
    if args.plot:
        print(f"plot: {plot_accuracy(results, args.plot)}")

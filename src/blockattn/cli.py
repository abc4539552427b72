"""`blockattn <verb> ...`: each verb is a module in `blockattn.commands` with `HELP`,
`add_arguments(parser)` and `run(args) -> int | None`, so adding a verb touches one new file."""
import argparse
import importlib
import pkgutil
import sys

from blockattn import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockattn", description=__doc__.split("\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"blockattn.commands.{info.name}")
        verb = verbs.add_parser(info.name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(verb)
        verb.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, TypeError) as error:
        # a bad value on the command line (a misspelt method or model name, a bad parameter): one line
        # naming what was wrong and what is known, as argparse does for its own errors, not a traceback
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"blockattn {args.verb}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

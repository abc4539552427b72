import argparse

HELP = "offline calibration of a method or KV policy on a model (moa: per-head span plan JSON for hf.patch(kv=))"

CALIBRATIONS = {"moa": "blockattn.kv.moa_calibrate"}


def add_arguments(parser):
    parser.add_argument("name", choices=sorted(CALIBRATIONS), help="what to calibrate")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the calibration's own options (blockattn calibrate moa --help lists them)")


def run(args):
    import importlib
    importlib.import_module(CALIBRATIONS[args.name]).main(args.options)

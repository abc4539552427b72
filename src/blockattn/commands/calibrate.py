import argparse

HELP = ("offline calibration of a method or KV policy on a model (moa: per-head span plan JSON for hf.patch(kv=); "
        "vertical_slash: MInference's per-head pattern search; xattention: per-head thresholds)")

# name -> "module" (its main) or "module:function", each taking the calibration's own argv
CALIBRATIONS = {"moa": "blockattn.kv.moa_calibrate",
                "vertical_slash": "blockattn.methods.calibration:vertical_slash_main",
                "xattention": "blockattn.methods.calibration:xattention_main"}


def add_arguments(parser):
    parser.add_argument("name", choices=sorted(CALIBRATIONS), help="what to calibrate")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the calibration's own options (blockattn calibrate NAME --help lists them)")


def run(args):
    import importlib
    module, _, function = CALIBRATIONS[args.name].partition(":")
    getattr(importlib.import_module(module), function or "main")(args.options)

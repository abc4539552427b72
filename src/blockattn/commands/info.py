import torch

import blockattn

HELP = "print the version and which attention backends are available (and why not)"


def add_arguments(parser):
    pass


def run(args):
    print(f"blockattn {blockattn.__version__}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    from blockattn.bench.machine import cpu_description
    from blockattn.ops import cpu

    print(f"cpu: {cpu_description()}")
    for name, status in blockattn.backends().items():
        print(f"  {name:<10} {status}")
        if name == "cpu" and status == "available":
            for dtype, path in cpu.paths().items():
                print(f"  {'':<10}   {dtype}: {path}")

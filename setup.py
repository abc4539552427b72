"""Builds the optional compiled CPU kernel (blockattn.ops.cpu._kernel) against the installed torch.

The kernel is x86 code (AVX2/FMA, AVX-512 selected at run time); on other machines it is not built.
If the compiler or OpenMP is missing the build is skipped with a warning: the package still
installs and imports, the portable `torch` backend takes over, and `blockattn.backends()` says why.
"""
import glob
import os
import platform
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as error:  # the kernel is optional: never fail the install over it
                print(f"WARNING: blockattn CPU kernel not built ({error}); the torch backend will be used",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                print(f"WARNING: blockattn CPU kernel not built ({error}); the torch backend will be used",
                      file=sys.stderr)

    kernel_dir = os.path.join("src", "blockattn", "ops", "cpu")
    source = os.path.join(kernel_dir, "kernel.cpp")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"NOTE: blockattn's CPU kernel is x86 code; not built on {platform.machine()} "
              "(the torch backend will be used)", file=sys.stderr)
    elif os.path.exists(source):
        ext_modules.append(CppExtension(
            "blockattn.ops.cpu._kernel",
            [source],
            depends=glob.glob(os.path.join(kernel_dir, "*.h")),
            extra_compile_args=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            # links to libgomp.so.1, which resolves to the copy torch has already loaded: one OpenMP runtime
            extra_link_args=["-fopenmp"],
        ))
    cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)
except ImportError:
    print("WARNING: torch is not installed at build time; the CPU kernel is not built", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)

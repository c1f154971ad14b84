"""Builds the CPU kernels of MABN's training-step ops (mmdet_bnplug/ops/csrc/mabn_cpu.cpp,
the extension ``mmdet_bnplug.ops._mabn_cpu``; the ops themselves are in
mmdet_bnplug/ops/mabn.py).

Everything else is declared in pyproject.toml. The extension needs torch at build time
(``pip install --no-build-isolation``) and a C++17 compiler, both of which mmcv's build
from source needs too. A compile error fails the install: a package that silently trains
MABN on CPU several times slower is worse than an error. Only when torch is not
importable at build time (an isolated build) does the package install without the
kernels, and it says so; MABN on CPU then uses the ops' PyTorch implementation (same
results, slower on small feature maps, and a warning at the first training step).
"""
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # an isolated build environment without torch
    print('mmdet-bnplug: WARNING: torch is not importable at build time; building WITHOUT '
          "MABN's compiled CPU kernels (mmdet_bnplug.ops._mabn_cpu). Install with "
          'pip install --no-build-isolation to build them.', file=sys.stderr)
else:
    ext_modules = [CppExtension('mmdet_bnplug.ops._mabn_cpu',
                                ['mmdet_bnplug/ops/csrc/mabn_cpu.cpp'],
                                extra_compile_args=['-O3'])]
    cmdclass = {'build_ext': BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Builds the CPU kernels of the norm layers: MABN's training-step ops
(mmdet_bnplug/ops/csrc/mabn_cpu.cpp, the extension ``mmdet_bnplug.ops._mabn_cpu``; the ops
themselves are in mmdet_bnplug/ops/mabn.py) and PortableSyncBN's per-call arithmetic
(csrc/sync_bn_cpu.cpp, ``mmdet_bnplug.ops._sync_bn_cpu``; the layer is in
mmdet_bnplug/layers/portable_sync_bn.py). Both include csrc/cpu_common.h.

Everything else is declared in pyproject.toml. The extension needs torch at build time
(``pip install --no-build-isolation``) and a C++17 compiler, both of which mmcv's build
from source needs too. A compile error fails the install: a package that silently trains
MABN on CPU several times slower is worse than an error. Only when torch is not
importable at build time (an isolated build) does the package install without the
kernels, and it says so; on CPU both layers then use their PyTorch implementation (same
results, slower on small feature maps; MABN warns at its first training step).
"""
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # an isolated build environment without torch
    print('mmdet-bnplug: WARNING: torch is not importable at build time; building WITHOUT '
          "the compiled CPU kernels (mmdet_bnplug.ops._mabn_cpu, _sync_bn_cpu). Install with "
          'pip install --no-build-isolation to build them.', file=sys.stderr)
else:
    ext_modules = [CppExtension(f'mmdet_bnplug.ops._{name}_cpu',
                                [f'mmdet_bnplug/ops/csrc/{name}_cpu.cpp'],
                                depends=['mmdet_bnplug/ops/csrc/cpu_common.h'],
                                extra_compile_args=['-O3'])
                   for name in ('mabn', 'sync_bn')]
    cmdclass = {'build_ext': BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

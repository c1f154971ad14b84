"""Builds MABN's compiled CPU training step (mmdet_bnplug/ops/csrc/mabn_cpu.cpp).

Everything else is declared in pyproject.toml. The extension needs torch at build time
(``pip install --no-build-isolation``) and a C++17 compiler, both of which mmcv's build
from source needs too. Without either, or if the compile fails, the package installs
without it (with a warning) and MABN on CPU uses its PyTorch step: same results, slower
on small feature maps, and a warning at the first training step.
"""
import warnings

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # an isolated build environment without torch
    warnings.warn('mmdet-bnplug: torch is not importable at build time, building without '
                  "MABN's compiled CPU step (install with --no-build-isolation)")
else:

    class OptionalBuildExtension(BuildExtension):
        """A failed compile is a warning, not a failed install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 (any compiler or toolchain error)
                warnings.warn(f'mmdet-bnplug: building {ext.name} failed ({err}); MABN '
                              f'on CPU falls back to its PyTorch step')

    ext_modules = [CppExtension('mmdet_bnplug.ops._mabn_cpu',
                                ['mmdet_bnplug/ops/csrc/mabn_cpu.cpp'],
                                extra_compile_args=['-O3'])]
    cmdclass = {'build_ext': OptionalBuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""mmdet-bnplug: batch normalisation for small per-GPU batches in mmdet 3.x.

Importing the package applies the stack fixes of :mod:`mmdet_bnplug.patches` (each can be
switched off) and registers the layers, the ``NormEval`` builder and the hooks in
mmengine's root registries, so ``custom_imports = dict(imports=['mmdet_bnplug'])`` is all
a config needs.
"""
from . import patches

patches.apply_enabled()

# registers the hooks and optimizer wrapper, then MABN, ConvWC, EvalBN, PortableSyncBN
# and NormEval, then the per-level-norm heads
from . import engine, heads, layers  # noqa: E402,F401

__version__ = '0.1.0'

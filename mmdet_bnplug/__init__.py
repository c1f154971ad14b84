"""mmdet-bnplug: batch normalisation for small per-GPU batches in mmdet 3.x.

Importing the package applies the stack fixes of :mod:`mmdet_bnplug.patches` (each can be
switched off) and registers the layers, the ``NormEval`` builder and the hooks in
mmengine's root registries, so ``custom_imports = dict(imports=['mmdet_bnplug'])`` is all
a config needs.
"""
from . import patches

patches.apply_enabled()

from . import engine  # noqa: E402,F401  (registers NormEvalCheckHook)
from . import layers  # noqa: E402,F401  (registers MABN, ConvWC, EvalBN, PortableSyncBN, NormEval)

__version__ = '0.1.0'

"""mmdet-bnplug: batch normalisation for small per-GPU batches in mmdet 3.x.

Importing the package applies the stack fixes of :mod:`mmdet_bnplug.patches` (each can be
switched off) and registers the layers, the ``NormEval`` builder and the hooks in
mmengine's root registries, so ``custom_imports = dict(imports=['mmdet_bnplug'])`` is all
a config needs.
"""
from . import patches

patches.apply_enabled()

# registers the hooks and optimizer wrapper, then MABN, ConvWC, EvalBN, PortableSyncBN,
# LevelNorm and NormEval; with mmdet installed (not in an mmseg- or mmpretrain-only
# environment), the per-level-norm heads
from importlib.util import find_spec  # noqa: E402

from . import engine, layers  # noqa: E402,F401

if find_spec('mmdet') is not None:
    from . import heads  # noqa: F401

__version__ = '0.1.0'

"""mmdet-bnplug: batch normalisation for small per-GPU batches in mmdet 3.x.

Importing the package registers its layers, hooks and helpers in mmengine's root
registries (so ``custom_imports = dict(imports=['mmdet_bnplug'])`` is all a config
needs) and applies the stack's compatibility fixes (``mmdet_bnplug.compat``).
"""
from . import compat  # noqa: F401  (first: the fixes apply on import)
from . import norms  # noqa: F401  (registers the norm layers)
from . import conv_wc  # noqa: F401  (registers ConvWC)
from . import norm_eval  # noqa: F401  (registers NormEval)
from . import hooks  # noqa: F401  (registers NormEvalCheckHook)
from . import sync_bn_conversion  # noqa: F401  (sync_bn keeps the plugin's layers)

__version__ = '0.1.0'

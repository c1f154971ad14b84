"""Norm layers, one per module; importing registers them in mmengine's root MODELS."""
from . import eval_bn  # noqa: F401
from . import mabn  # noqa: F401
from . import portable_sync_bn  # noqa: F401

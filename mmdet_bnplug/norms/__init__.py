"""Norm layers, one per module; importing registers them in mmengine's root MODELS."""
from . import mabn  # noqa: F401

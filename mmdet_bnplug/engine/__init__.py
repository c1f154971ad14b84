"""Training-loop components, registered in mmengine's root registries."""
from .hooks import NormEvalCheckHook

__all__ = ['NormEvalCheckHook']

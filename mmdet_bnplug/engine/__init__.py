"""Training-loop components, registered in mmengine's root registries."""
from .hooks import NormEvalCheckHook, NormMomentumPerStepHook
from .optim_wrappers import AutocastOptimWrapper

__all__ = ['AutocastOptimWrapper', 'NormEvalCheckHook', 'NormMomentumPerStepHook']

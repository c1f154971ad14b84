"""Training-loop components, registered in mmengine's root registries."""
from .hooks import FreezeNormsHook, GlobalLossNormHook, NormEvalCheckHook, NormMomentumPerStepHook
from .optim_wrappers import AutocastOptimWrapper

__all__ = ['AutocastOptimWrapper', 'FreezeNormsHook', 'GlobalLossNormHook', 'NormEvalCheckHook',
           'NormMomentumPerStepHook']

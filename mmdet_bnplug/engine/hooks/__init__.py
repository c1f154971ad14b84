from .accumulation_momentum import NormMomentumPerStepHook
from .norm_eval_check import NormEvalCheckHook

__all__ = ['NormEvalCheckHook', 'NormMomentumPerStepHook']

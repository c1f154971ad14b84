from .accumulation_momentum import NormMomentumPerStepHook
from .freeze_norms import FreezeNormsHook, freeze_norms
from .norm_eval_check import NormEvalCheckHook

__all__ = ['FreezeNormsHook', 'NormEvalCheckHook', 'NormMomentumPerStepHook', 'freeze_norms']

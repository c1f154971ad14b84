from .accumulation_momentum import NormMomentumPerStepHook
from .freeze_norms import FreezeNormsHook, freeze_norms
from .global_loss_norm import GlobalLossNormHook, global_loss_norm
from .norm_eval_check import NormEvalCheckHook

__all__ = ['FreezeNormsHook', 'GlobalLossNormHook', 'NormEvalCheckHook',
           'NormMomentumPerStepHook', 'freeze_norms', 'global_loss_norm']

"""The norm layers and ConvWC, one per module, registered in mmengine's root MODELS."""
from .conv_wc import ConvWC
from .eval_bn import EvalBN
from .level_norm import LevelNorm, LevelRouted
from .mabn import MABN
from .norm_eval import NormEvalMixin, apply_norm_eval, build_norm_eval
from .portable_sync_bn import PortableSyncBN

__all__ = ['ConvWC', 'EvalBN', 'LevelNorm', 'LevelRouted', 'MABN', 'NormEvalMixin',
           'PortableSyncBN', 'apply_norm_eval', 'build_norm_eval']

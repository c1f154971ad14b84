"""Detection heads of this package, registered in mmengine's root MODELS."""
from .level_norm import (
    LevelNormATSSHead,
    LevelNormFCOSHead,
    LevelNormHeadMixin,
    LevelNormRetinaHead,
    LevelNormRPNHead,
    NormedRPNHead,
    level_norm_head_class,
)

__all__ = ['LevelNormATSSHead', 'LevelNormFCOSHead', 'LevelNormHeadMixin',
           'LevelNormRPNHead', 'LevelNormRetinaHead', 'NormedRPNHead',
           'level_norm_head_class']

"""Model surgery: switch norm types, fold norms into convs, BN checkpoints into MABN models."""
from .convert import convert_norm
from .fuse import fuse_norm, fuse_norm_report

__all__ = ['convert_norm', 'fuse_norm', 'fuse_norm_report']

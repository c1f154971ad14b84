from .autocast import AutocastOptimWrapper

__all__ = ['AutocastOptimWrapper']

from .norm_eval_check import NormEvalCheckHook

__all__ = ['NormEvalCheckHook']

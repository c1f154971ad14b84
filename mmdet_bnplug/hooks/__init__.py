"""mmengine hooks, registered in mmengine's root HOOKS."""
from .norm_eval_check import NormEvalCheckHook  # noqa: F401

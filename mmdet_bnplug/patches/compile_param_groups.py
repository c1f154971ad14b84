"""mmengine's ``compile`` option works with optimizers built from a config.

``compile=True`` (or a dict of ``torch.compile`` options) in a config makes mmengine's
Runner compile the model's ``train_step``, which runs the optimizer step too. mmengine
builds the optimizer from a ``ConfigDict``, so its param groups are ``ConfigDict``s, and
torch 2.13's dynamo fails on them inside ``Optimizer.step`` (``InternalTorchDynamoError:
'UserDefinedDictVariable' object has no attribute 'items'``), for every model and norm.
Importing this module (``import mmdet_bnplug`` does) makes the Runner turn the param
groups into plain dicts (same keys and values, the same parameter lists) just before it
compiles; without ``compile`` nothing changes.

Versions: mmengine 0.10.x (``Runner._maybe_compile``), torch 2.13.
"""
from mmengine.runner import Runner

_mmengine_maybe_compile = Runner._maybe_compile


def plain_param_groups(optim_wrapper) -> None:
    """Replace, in place, every param group of ``optim_wrapper`` (an OptimWrapper or an
    OptimWrapperDict) that is a dict subclass by a plain dict of the same items."""
    wrappers = (optim_wrapper.values() if hasattr(optim_wrapper, 'optim_wrappers')
                else [optim_wrapper])
    for wrapper in wrappers:
        groups = wrapper.optimizer.param_groups
        groups[:] = [g if type(g) is dict else dict(g) for g in groups]


def _maybe_compile(self, target: str) -> None:
    if self.cfg.get('compile') and target == 'train_step':
        plain_param_groups(self.optim_wrapper)
    _mmengine_maybe_compile(self, target)


def apply() -> None:
    """Route the Runner's compile step through ours (idempotent)."""
    Runner._maybe_compile = _maybe_compile


def revert() -> None:
    """Restore mmengine's own compile step."""
    Runner._maybe_compile = _mmengine_maybe_compile

"""The config key ``sync_bn`` keeps this package's norm layers as they are.

mmengine's Runner, in a distributed run whose config sets ``sync_bn='torch'`` (or
``'mmcv'``), calls ``mmengine.model.convert_sync_batchnorm``, which replaces every
``_BatchNorm`` subclass with a SyncBN. That would turn ``MABN`` or ``EvalBN`` silently
into a plain trainable SyncBN and ``PortableSyncBN`` into torch's CUDA-only one. Importing
this module (``import mmdet_bnplug`` does) installs a converter that converts the other
BN layers as before and leaves every layer defined in this package (and subclasses of
those) untouched, logging what it kept.

Versions: mmengine 0.10.x (the Runner looks ``convert_sync_batchnorm`` up in its own module).
"""
import mmengine.model
import mmengine.model.utils
import mmengine.runner.runner
from mmengine.logging import print_log
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_PACKAGE = __name__.split('.')[0]
_IMPLEMENTATIONS = ('torch', 'mmcv')
# mmengine's own converter, kept for the layers that are not ours
_mmengine_convert = mmengine.model.utils.convert_sync_batchnorm


def is_plugin_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a BN-like layer of this package (or a subclass of one)."""
    return isinstance(module, _BatchNorm) and any(
        cls.__module__.split('.')[0] == _PACKAGE for cls in type(module).__mro__)


def _convert(module, implementation, kept):
    if is_plugin_norm(module):
        kept.append(type(module).__name__)
        return module
    if isinstance(module, _BatchNorm):
        return _mmengine_convert(module, implementation)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, implementation, kept))
    return module


def convert_sync_batchnorm(module: nn.Module, implementation: str = 'torch') -> nn.Module:
    """mmengine's ``convert_sync_batchnorm`` that leaves this package's layers as they are.

    Args:
        module: the model; converted in place where possible, the result is returned.
        implementation: ``'torch'`` (torch SyncBatchNorm) or ``'mmcv'`` (MMSyncBN), the
            target for the other ``_BatchNorm`` layers.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f'sync_bn should be "torch" or "mmcv", but got {implementation!r}')
    kept = []
    module = _convert(module, implementation, kept)
    if kept:
        names = ', '.join(f'{n} x{kept.count(n)}' for n in sorted(set(kept)))
        print_log(f'sync_bn={implementation!r}: kept {len(kept)} {_PACKAGE} norm layers '
                  f'unconverted ({names}); other BN layers became SyncBN.', logger='current')
    return module


# The Runner looks the name up in its own module; ``mmengine.model`` serves direct callers.
# ``mmengine.model.utils`` keeps the original.
_TARGETS = (mmengine.model, mmengine.runner.runner)


def apply() -> None:
    """Route the Runner's and ``mmengine.model``'s converter to ours (idempotent)."""
    for module in _TARGETS:
        module.convert_sync_batchnorm = convert_sync_batchnorm


def revert() -> None:
    """Restore mmengine's own converter."""
    for module in _TARGETS:
        module.convert_sync_batchnorm = _mmengine_convert

"""Fixes to the stack, one module each, applied by ``import mmdet_bnplug``.

- ``safe_loading``: allow-lists, for torch's ``weights_only`` loading, narrow stand-ins for
  the classes that mmengine 0.10.7 checkpoints hold (torch >= 2.6 loads with
  ``weights_only=True`` by default and refuses them), loads URL checkpoints with
  ``weights_only=True`` and never lets ``Runner.resume`` execute a checkpoint's config.
- ``cpu_distributed``: mmengine's PyTorch launcher and DDP wrapper on a machine with no
  accelerator use gloo and no ``device_ids`` (mmengine calls ``torch.cuda.set_device``
  and passes ``device_ids`` for a CPU model).
- ``sync_bn_conversion``: the config key ``sync_bn`` converts plain BN only, not this
  package's layers (mmengine would silently turn MABN or EvalBN into torch's CUDA-only
  SyncBN).
- ``compile_param_groups``: mmengine's ``compile`` option compiles the optimizer step too,
  which torch 2.13's dynamo cannot trace over the ``ConfigDict`` param groups mmengine
  builds; they become plain dicts before compiling.

Switch patches off before the import with ``MMDET_BNPLUG_DISABLE_PATCHES`` (a comma-separated
list of the names above, or ``all``), or after it with ``revert(name)``.
"""
import importlib
import os

PATCHES = ('safe_loading', 'cpu_distributed', 'sync_bn_conversion', 'compile_param_groups')
DISABLE_ENV = 'MMDET_BNPLUG_DISABLE_PATCHES'


def disabled_patches() -> set:
    """Names switched off by ``MMDET_BNPLUG_DISABLE_PATCHES``; unknown names are an error."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, '').split(',') if n.strip()}
    unknown = names - set(PATCHES) - {'all'}
    if unknown:  # in any combination, 'all' included
        raise ValueError(f'{DISABLE_ENV}: unknown patch name(s) {sorted(unknown)}; '
                         f'accepted: {", ".join(PATCHES)} or all')
    return set(PATCHES) if 'all' in names else names


def _module(name: str):
    if name not in PATCHES:
        raise ValueError(f'unknown patch {name!r}; accepted: {", ".join(PATCHES)}')
    return importlib.import_module(f'{__name__}.{name}')


def apply(name: str) -> None:
    """Apply one patch (idempotent)."""
    _module(name).apply()


def revert(name: str) -> None:
    """Undo one patch, restoring the stack's own behaviour; only what the patch itself
    added is removed (idempotent)."""
    _module(name).revert()


def apply_enabled() -> None:
    """Apply every patch not switched off by the environment."""
    off = disabled_patches()
    for name in PATCHES:
        if name not in off:
            apply(name)

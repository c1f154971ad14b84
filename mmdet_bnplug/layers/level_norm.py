"""Per-level modules for detection heads that apply the same layers to every FPN level.

A head that shares its convs and norms across levels mixes the levels' activations, whose
scales differ, in one set of batch statistics (and, for MABN, in one set of moving
averages). :class:`LevelNorm` holds one norm per level instead; the head says which level
it is computing (:func:`at_level`, set by :mod:`mmdet_bnplug.heads.level_norm` around each
``forward_single``), and the layer refuses to run when no level is set.
"""
import contextlib
import contextvars

import torch
from mmengine.logging import print_log
from torch import nn

from ..utils.bn_like import is_bn_like
from ..utils.checks import check_bool

_ROUTE = contextvars.ContextVar('mmdet_bnplug_fpn_level', default=None)


class _Route:
    """The level being computed, and for activation checkpointing the store of each
    module's buffers before its forward (``replay``: the recomputation)."""

    def __init__(self, level, store, replay):
        self.level, self.store, self.replay = level, store, replay


def current_level():
    """The FPN level being computed (an int from 0), or None outside a routed head."""
    route = _ROUTE.get()
    return None if route is None else route.level


@contextlib.contextmanager
def at_level(level: int, store=None, replay: bool = False):
    """Route every :class:`LevelRouted` module called inside to ``level``'s module.

    For activation checkpointing, the forward runs with a ``store`` (a dict) and the
    recomputation with the same ``store`` and ``replay=True``: each module then
    recomputes from its buffers as they were before its forward (so MABN's moving
    averages give the same output again) and keeps its buffers as they are (running
    statistics are not updated twice)."""
    token = _ROUTE.set(_Route(level, store, replay))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def _buffers(module):
    return [b.detach().clone() for b in module.buffers()]


def _set_buffers(module, values):
    with torch.no_grad():
        for buf, value in zip(module.buffers(), values):
            buf.copy_(value)


class LevelRouted(nn.ModuleList):
    """One module per FPN level; ``forward(x)`` applies the current level's (module ``i``
    for level ``i``, shapes those of the modules)."""

    def forward(self, x):
        route = _ROUTE.get()
        if route is None:
            raise RuntimeError(
                f'{type(self).__name__}: called with no FPN level set; it runs only inside '
                "a level-routed head's forward_single (mmdet_bnplug.heads: LevelNorm* "
                'heads). Activation checkpointing of the head goes through its with_cp '
                'option, which restores the level on recomputation')
        if not 0 <= route.level < len(self):
            raise RuntimeError(f'{type(self).__name__}: FPN level {route.level} out of '
                               f'range: it holds {len(self)} levels (0 to {len(self) - 1})')
        module = self[route.level]
        if route.store is None:
            return module(x)
        if not route.replay:
            route.store[id(module)] = _buffers(module)
            return module(x)
        after = _buffers(module)
        _set_buffers(module, route.store[id(module)])
        try:
            return module(x)
        finally:
            _set_buffers(module, after)


class LevelNorm(LevelRouted):
    """Per-level copies of one BN-like norm: statistics per level, and the affine per
    level or, with ``shared_affine=True``, level 0's ``weight`` and ``bias`` Parameters
    shared by every level.

    Args:
        norms: the levels' norms, all of one BN-like type and size (level ``i`` first
            for ``i = 0, 1, ...``).
        shared_affine: share level 0's affine Parameters (one Parameter object under
            each level's name; mmengine's optimizer constructor then needs
            ``paramwise_cfg=dict(bypass_duplicate=True)`` when it has a paramwise_cfg).

    Loads a state dict of the single shared norm it replaces: each level starts from
    its statistics and affine (logged).
    """

    def __init__(self, norms, shared_affine: bool = False):
        norms = list(norms)
        check_bool('LevelNorm', 'shared_affine', shared_affine)
        if len(norms) < 2:
            raise ValueError(f'LevelNorm: norms must hold at least 2 levels, got {len(norms)}')
        kinds = {(type(n), getattr(n, 'num_features', None)) for n in norms}
        if not all(is_bn_like(n) for n in norms) or len(kinds) != 1:
            raise ValueError('LevelNorm: norms must be BN-like layers of one type and '
                             f'size, got {sorted(type(n).__name__ for n in norms)}')
        super().__init__(norms)
        self.shared_affine = shared_affine
        self.tie_affine()

    def tie_affine(self) -> None:
        """With ``shared_affine``: make every level use level 0's weight and bias
        Parameters (again, e.g. after a conversion replaced the levels)."""
        if not self.shared_affine:
            return
        first = self[0]
        for norm in list(self)[1:]:
            for name in ('weight', 'bias'):
                if isinstance(getattr(first, name, None), nn.Parameter):
                    setattr(norm, name, getattr(first, name))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        names = list(self[0].state_dict().keys())
        shared = [n for n in names if prefix + n in state_dict]
        if shared and not any(f'{prefix}{i}.{n}' in state_dict
                              for i in range(len(self)) for n in names):
            metadata = getattr(state_dict, '_metadata', None)
            for i in range(len(self)):
                for n in shared:
                    state_dict[f'{prefix}{i}.{n}'] = state_dict[prefix + n]
                if metadata is not None and prefix[:-1] in metadata:
                    metadata[f'{prefix}{i}'] = metadata[prefix[:-1]]
            for n in shared:
                del state_dict[prefix + n]
            print_log(f'LevelNorm {prefix[:-1]}: loaded the shared norm of the checkpoint '
                      f'into each of its {len(self)} levels (per-level statistics start '
                      'from the shared ones)', logger='current')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


def retie_level_norms(model: nn.Module) -> None:
    """:meth:`LevelNorm.tie_affine` for every LevelNorm of ``model``."""
    for module in model.modules():
        if isinstance(module, LevelNorm):
            module.tie_affine()

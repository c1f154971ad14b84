"""mmengine 0.10.7 checkpoints under torch's safe (``weights_only``) loading.

Why: torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls
``torch.load`` without the argument, so its own checkpoints fail: they hold the message
hub's ``HistoryBuffer`` objects and numpy arrays and scalars of the logged values.

What: the allow-list gains exactly those classes and numpy's two array/scalar rebuild
functions, and, under the name ``builtins.getattr`` (how a pickle written with protocol 2
refers to the method ``HistoryBuffer.min``), a stand-in that returns a public statistics
method of ``HistoryBuffer`` and refuses everything else. The real ``getattr``, ``eval``,
``exec``, ``__import__``, ``functools.partial`` and every other generic callable stay off
the list: with one of them on it, a checkpoint becomes a program. Safe loading stays on.

Also: mmengine loads URL checkpoints (``http(s)://``, ``torchvision://``,
``open-mmlab://``, ... in ``load_from`` or a ``Pretrained`` init) through torch.hub's
``load_state_dict_from_url``, whose default is ``weights_only=False``: full unpickling of
a downloaded file. The patch makes that loader pass ``weights_only=True``.

Versions: torch >= 2.6 (the allow-list's ``(object, name)`` form), mmengine 0.10.x.
"""
import functools
import pickle

import mmengine.runner.checkpoint as mm_checkpoint
import numpy as np
import torch
from mmengine.logging import HistoryBuffer

# HistoryBuffer's own statistics; methods added with HistoryBuffer.register_statistics
# are accepted too (looked up when a checkpoint is loaded).
_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_method(owner, name):
    """``getattr(HistoryBuffer, name)`` for a statistics method, else UnpicklingError.

    Serves only the ``getattr`` calls that pickled ``HistoryBuffer`` objects make.
    """
    allowed = set(_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or not isinstance(name, str) or \
            name.startswith('_') or name not in allowed:
        raise pickle.UnpicklingError(
            f'mmdet_bnplug safe loading: getattr({owner!r}, {name!r}) refused; a '
            'checkpoint may only name the statistics methods of mmengine\'s HistoryBuffer '
            f'({", ".join(sorted(allowed))})')
    return getattr(HistoryBuffer, name)


def _numpy_globals() -> list:
    """numpy's array/scalar rebuild functions and the classes of logged values, each
    under the name pickles give it (``numpy.core`` before numpy 2, ``numpy._core`` after)."""
    core = getattr(np, '_core', None) or np.core
    rebuild = [core.multiarray._reconstruct, core.multiarray.scalar]
    dtype_classes = [type(np.dtype(name)) for name in
                     ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    named = []
    for fn in rebuild:  # a checkpoint written under the other numpy major names the other
        for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            named.append((fn, f'{module}.{fn.__name__}'))
    return [*named, np.ndarray, np.dtype, *dtype_classes]


def allowed_globals() -> list:
    """The exact entries this patch adds to torch's ``weights_only`` allow-list."""
    return [HistoryBuffer, (history_buffer_method, 'builtins.getattr'), *_numpy_globals()]


_ORIGINAL = {}


def _safe_url_loader(load_url):
    @functools.wraps(load_url)
    def load_url_weights_only(*args, **kwargs):
        kwargs['weights_only'] = True
        return load_url(*args, **kwargs)
    return load_url_weights_only


def apply() -> None:
    """Add :func:`allowed_globals` to torch's allow-list and make mmengine's URL loader
    load with ``weights_only=True`` (idempotent)."""
    torch.serialization.add_safe_globals(allowed_globals())
    if not _ORIGINAL:
        _ORIGINAL['load_url'] = mm_checkpoint.load_url
        mm_checkpoint.load_url = _safe_url_loader(_ORIGINAL['load_url'])


def revert() -> None:
    """Remove exactly this patch's entries from torch's allow-list; restore mmengine's
    URL loader."""
    ours = allowed_globals()
    keep = [e for e in torch.serialization.get_safe_globals() if e not in ours]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(keep)
    if _ORIGINAL:
        mm_checkpoint.load_url = _ORIGINAL.pop('load_url')

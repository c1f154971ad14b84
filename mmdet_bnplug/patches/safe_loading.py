"""mmengine 0.10.7 checkpoints under torch's safe (``weights_only``) loading.

Why: torch >= 2.6 loads with ``weights_only=True`` by default and mmengine 0.10.7 calls
``torch.load`` without the argument, so its own checkpoints fail: they hold the message
hub's ``HistoryBuffer`` objects and numpy arrays and scalars of the logged values.

What: the allow-list gains narrow stand-ins under the names those pickles use, never the
real classes (``numpy.ndarray``, ``numpy.dtype`` and mmengine's ``HistoryBuffer`` can each
be made to do harm by a crafted pickle: object arrays whose elements are forged pointers,
dtypes given object fields through ``__setstate__``, a class-wide table rewritten):

- ``numpy.dtype``: :class:`PickledDtype`, one of a fixed set of plain numeric dtypes
  (bool, integers, floats, complex) in numpy's own pickled form; nothing else.
- ``numpy.ndarray`` and ``numpy.core``/``numpy._core`` ``multiarray._reconstruct``:
  :class:`LoadedArray`, an ``np.ndarray`` subclass built only from such a dtype, a shape
  and exactly the bytes it needs; it pickles again as a plain ``np.ndarray``.
- ``multiarray.scalar``: :func:`numpy_scalar`, a numpy scalar of such a dtype.
- ``builtins.bytes`` (how protocol 2 writes ``b''``, the data of an empty array):
  :func:`empty_bytes`, which takes no argument.
- mmengine's ``HistoryBuffer``: :class:`LoadedHistoryBuffer`, a subclass rebuilt from its
  data only (``max_length`` and two 1-D numeric arrays), then mmengine's own class; the
  pickled table of statistics methods is ignored, so loading changes no class-level state.
- ``builtins.getattr`` (how a pickle written with protocol 2 refers to
  ``HistoryBuffer.min``): :func:`history_buffer_method`, which returns one of
  HistoryBuffer's four own statistics methods, a fixed set, and refuses everything else.

The real ``getattr``, ``eval``, ``exec``, ``__import__``, ``functools.partial`` and every
other generic callable stay off the list: with one of them on it, a checkpoint becomes a
program. Safe loading stays on.

Also: mmengine loads URL checkpoints (``http(s)://``, ``torchvision://``,
``open-mmlab://``, ... in ``load_from`` or a ``Pretrained`` init) through torch.hub's
``load_state_dict_from_url``, whose default is ``weights_only=False``: full unpickling of
a downloaded file. The patch makes that loader pass ``weights_only=True``. And
``Runner.resume`` executes ``meta['config']`` of the checkpoint it resumes as Python
(``Config.fromstring``, for a GPU-count check; mmengine's own checkpoints store no such
key): the patch drops that key from what ``Runner.load_checkpoint`` returns, with a
warning, so resuming never runs config text from a checkpoint.

Versions: torch >= 2.6 (the allow-list's ``(object, name)`` form), numpy 1.x and 2.x,
mmengine 0.10.x.
"""
import functools
import logging
import math
import pickle

import mmengine.runner.checkpoint as mm_checkpoint
import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import Runner

# numpy's pickled type codes (``np.dtype(code).__reduce__()[1][0]``) that a checkpoint may
# name: plain numeric dtypes, no objects, no fields, no sub-arrays, no metadata
NUMERIC_CODES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2', 'f4', 'f8',
                 'c8', 'c16')
# HistoryBuffer's own statistics methods: the only names the getattr stand-in serves
STATISTICS = ('min', 'max', 'current', 'mean')
_MAX_DIMS = 32  # numpy's limit on an array's number of dimensions


def _refuse(what: str):
    return pickle.UnpicklingError(f'mmdet_bnplug safe loading: {what} refused')


class PickledDtype:
    """Loaded in place of ``numpy.dtype``: ``.dtype`` is one of :data:`NUMERIC_CODES`.

    A pickle builds it as numpy writes a dtype, ``numpy.dtype(code, False, True)`` and
    then the state ``(3, byteorder, None, None, None, -1, -1, 0)``; any other argument or
    state (object dtypes, fields, sub-arrays, metadata) raises UnpicklingError.
    """

    def __new__(cls, code=None, align=False, copy=True):
        if not isinstance(code, str) or code not in NUMERIC_CODES or align is not False \
                or copy is not True:
            raise _refuse(f'numpy.dtype{(code, align, copy)!r}: only a plain numeric dtype '
                          f'({", ".join(NUMERIC_CODES)}) in numpy\'s pickled form')
        self = super().__new__(cls)
        self.code, self.dtype = code, np.dtype(code)
        return self

    def __setstate__(self, state):
        itemsize = self.dtype.itemsize
        orders = ('|', ) if itemsize == 1 else ('<', '>', '=')
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[1] in orders and state[2:] == (None, None, None, -1, -1, 0)):
            raise _refuse(f'numpy dtype state {state!r} (only a plain numeric dtype\'s)')
        self.dtype = np.dtype(state[1] + self.code)


def _plain_dtype(dtype) -> np.dtype:
    if not isinstance(dtype, PickledDtype):
        raise _refuse(f'numpy value of dtype {dtype!r} (only a plain numeric dtype)')
    return dtype.dtype


class LoadedArray(np.ndarray):
    """Loaded in place of ``numpy.ndarray``: an array of a :class:`PickledDtype`, built
    from its shape and exactly ``prod(shape) * itemsize`` bytes. It cannot be constructed
    from a pickle in any other way, and it pickles again as a plain ``np.ndarray``."""

    def __new__(cls, *args, **kwargs):
        raise _refuse('numpy.ndarray(...) called by a checkpoint (arrays load only '
                      'through numpy\'s own _reconstruct form)')

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise _refuse(f'numpy array state of type {type(state).__name__}')
        _, shape, dtype, fortran, data = state
        dtype = _plain_dtype(dtype)
        if not (isinstance(shape, tuple) and len(shape) <= _MAX_DIMS and all(
                type(d) is int and d >= 0 for d in shape)) or type(fortran) is not bool:
            raise _refuse(f'numpy array shape {shape!r} / order {fortran!r}')
        if type(data) is not bytes or len(data) != math.prod(shape) * dtype.itemsize:
            raise _refuse(f'numpy array data for shape {shape} and dtype {dtype} (exactly '
                          f'{math.prod(shape) * dtype.itemsize} bytes are accepted)')
        if self.shape != (0, ) or self.dtype != np.uint8:
            raise _refuse('a second state for one numpy array')
        super().__setstate__((1, shape, dtype, fortran, data))

    def __reduce__(self):
        return self.view(np.ndarray).__reduce__()

    def __reduce_ex__(self, protocol):
        return self.view(np.ndarray).__reduce_ex__(protocol)


def reconstruct_array(cls, shape, typecode):
    """``multiarray._reconstruct`` as numpy's pickles call it, ``(ndarray, (0,), b'b')``:
    an empty :class:`LoadedArray` that the pickle's state then fills."""
    if cls is not LoadedArray or shape != (0, ) or typecode != b'b':
        raise _refuse(f'numpy _reconstruct{(cls, shape, typecode)!r}')
    return np.ndarray.__new__(LoadedArray, (0, ), np.uint8)


def numpy_scalar(dtype, data=None):
    """``multiarray.scalar(dtype, data)``: a numpy scalar of a :class:`PickledDtype` from
    exactly its ``itemsize`` bytes."""
    dtype = _plain_dtype(dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _refuse(f'numpy scalar data for dtype {dtype} (exactly {dtype.itemsize} '
                      'bytes are accepted)')
    return np.frombuffer(data, dtype=dtype)[0]


def empty_bytes(*args):
    """``bytes()`` as protocol 2 pickles ``b''``; any argument is refused."""
    if args:
        raise _refuse('bytes(...) with arguments')
    return b''


class LoadedHistoryBuffer(HistoryBuffer):
    """Loaded in place of mmengine's ``HistoryBuffer``: rebuilt from ``max_length`` and
    two 1-D numeric arrays of equal length (the logged values and their counts), then a
    plain ``HistoryBuffer``. The pickled ``statistics_methods`` table is ignored
    (mmengine's ``__setstate__`` writes it into the class-wide table); a second state for
    the same object is refused (it is no longer of an allow-listed class)."""

    _STATE_KEYS = {'max_length', '_log_history', '_count_history'}

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise _refuse('HistoryBuffer(...) called with arguments by a checkpoint')
        return super().__new__(cls)

    def __setstate__(self, state):
        if not isinstance(state, dict) or not (
                self._STATE_KEYS <= state.keys() <= self._STATE_KEYS | {'statistics_methods'}):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise _refuse(f'HistoryBuffer state {keys!r} (accepted: '
                          f'{sorted(self._STATE_KEYS)} and statistics_methods)')
        max_length, logs, counts = (state[k] for k in
                                    ('max_length', '_log_history', '_count_history'))
        if type(max_length) is not int or max_length < 1:
            raise _refuse(f'HistoryBuffer max_length {max_length!r}')
        for name, values in (('_log_history', logs), ('_count_history', counts)):
            if not isinstance(values, LoadedArray) or values.ndim != 1 or \
                    values.dtype.kind not in 'biuf':
                raise _refuse(f'HistoryBuffer {name} (a 1-D numeric array is accepted)')
        if len(logs) != len(counts) or len(logs) > max_length:
            raise _refuse(f'HistoryBuffer of {len(logs)} values and {len(counts)} counts '
                          f'(max_length {max_length})')
        self._set_default_statistics()  # the class's four defaults, as mmengine's own does
        self.max_length = max_length
        self._log_history = np.array(logs.view(np.ndarray))
        self._count_history = np.array(counts.view(np.ndarray))
        self.__class__ = HistoryBuffer  # mmengine's own class from here on (same layout)


def history_buffer_method(owner, name):
    """``getattr(HistoryBuffer, name)`` for one of :data:`STATISTICS`, else
    UnpicklingError. Serves only the ``getattr`` calls that pickled ``HistoryBuffer``
    objects make; the set of names is fixed here, whatever a checkpoint registers."""
    if owner not in (HistoryBuffer, LoadedHistoryBuffer) or name not in STATISTICS:
        raise _refuse(f'getattr({owner!r}, {name!r}): a checkpoint may only name the '
                      f'statistics methods of mmengine\'s HistoryBuffer ({", ".join(STATISTICS)})')
    return getattr(HistoryBuffer, name)


def allowed_globals() -> list:
    """The exact entries this patch adds to torch's ``weights_only`` allow-list, each
    ``(stand-in, name the pickle uses)``; numpy functions under both numpy majors'
    module names (``numpy.core`` before 2, ``numpy._core`` after)."""
    entries = [(LoadedHistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
               (history_buffer_method, 'builtins.getattr'),
               (PickledDtype, 'numpy.dtype'), (LoadedArray, 'numpy.ndarray'),
               (empty_bytes, 'builtins.bytes')]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(reconstruct_array, f'{module}._reconstruct'),
                    (numpy_scalar, f'{module}.scalar')]
    return entries


_ORIGINAL = {}


def _safe_url_loader(load_url):
    @functools.wraps(load_url)
    def load_url_weights_only(*args, **kwargs):
        kwargs['weights_only'] = True
        return load_url(*args, **kwargs)
    return load_url_weights_only


def _config_free_checkpoint(load_checkpoint):
    @functools.wraps(load_checkpoint)
    def load_checkpoint_without_config(*args, **kwargs):
        checkpoint = load_checkpoint(*args, **kwargs)
        meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict) and 'config' in meta:
            del meta['config']
            print_log("mmdet_bnplug: ignored the checkpoint's meta['config'] (config text "
                      'is Python; Runner.resume would execute it)', logger='current',
                      level=logging.WARNING)
        return checkpoint
    return load_checkpoint_without_config


def apply() -> None:
    """Add :func:`allowed_globals` to torch's allow-list (recording which were not there
    already), make mmengine's URL loader load with ``weights_only=True`` and drop
    ``meta['config']`` from the checkpoints the Runner loads (idempotent)."""
    if _ORIGINAL:
        return
    present = torch.serialization.get_safe_globals()
    _ORIGINAL['added'] = [e for e in allowed_globals() if e not in present]
    torch.serialization.add_safe_globals(_ORIGINAL['added'])
    _ORIGINAL['load_url'] = mm_checkpoint.load_url
    mm_checkpoint.load_url = _safe_url_loader(_ORIGINAL['load_url'])
    _ORIGINAL['load_checkpoint'] = Runner.load_checkpoint
    Runner.load_checkpoint = _config_free_checkpoint(_ORIGINAL['load_checkpoint'])


def revert() -> None:
    """Remove exactly the allow-list entries :func:`apply` added (entries the user had
    added stay); restore mmengine's URL loader and ``Runner.load_checkpoint``."""
    if not _ORIGINAL:
        return
    ours = _ORIGINAL.pop('added')
    keep = [e for e in torch.serialization.get_safe_globals() if e not in ours]
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(keep)
    mm_checkpoint.load_url = _ORIGINAL.pop('load_url')
    Runner.load_checkpoint = _ORIGINAL.pop('load_checkpoint')

"""Checkpoint reading and writing for the tools: a model from a config and a checkpoint,
and outputs that never replace an input and never exist half-written.

Checkpoints are read with torch's safe ``weights_only`` loading (see
``mmdet_bnplug.patches.safe_loading`` for the few classes mmengine's checkpoints add). The
config a checkpoint stores (``meta['cfg']``) is never used: mmengine's config text is
Python, run when it is loaded, so using it would make the checkpoint a program.
"""
import contextlib
import errno
import logging
import os
import os.path as osp
import signal
import stat
import tempfile
import threading

from cli import BadValue, MissingInput, UnwritableOutput

import torch
from mmengine.logging import print_log
from mmengine.registry import MODELS, DefaultScope

from run_config import check_norm_types, read_config

CONFIG_NEEDED = (
    "a config file is needed: the config stored in a checkpoint (meta['cfg']) is not used, "
    'because mmengine config text is Python and loading it runs whatever it holds; give '
    "the run's config file (its work dir holds the copy mmengine dumped, "
    'WORK_DIR/<config name>.py)')

_KINDS = {stat.S_IFDIR: 'a directory', stat.S_IFIFO: 'a FIFO', stat.S_IFSOCK: 'a socket',
          stat.S_IFCHR: 'a character device', stat.S_IFBLK: 'a block device'}


def check_output_path(out: str, inputs=()) -> None:
    """Refuses an output path before anything is built: BadValue if ``out`` is, or resolves
    to (symlinks, hard links), one of ``inputs``; UnwritableOutput if it is empty, exists
    and is not a regular file (a directory, FIFO, device, socket; links followed), or no
    file can be made in its (nearest existing) directory."""
    if not out:
        raise UnwritableOutput('the output path is empty')
    real_out = osp.realpath(out)
    for path in inputs:
        if path is None:
            continue
        same = real_out == osp.realpath(path) or (
            osp.exists(out) and osp.exists(path) and osp.samefile(out, path))
        if same:
            raise BadValue(f'output {out!r} is the input {path!r} (or a link to it): '
                           'choose another output path')
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        mode = None  # a new file (a dangling link is replaced by it)
    except OSError as err:  # a parent that is a file, no permission, ...
        raise _unwritable(out, err) from err
    if mode is not None and not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), 'a special file')
        raise UnwritableOutput(f'cannot write {out!r}: it is {kind}, not a regular file')
    directory = osp.dirname(osp.abspath(out))
    while not osp.exists(directory):  # write_atomic makes the missing ones
        directory = osp.dirname(directory)
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:  # read-only, no permission, ...
        raise _unwritable(out, err) from err


def write_atomic(out: str, write, inputs=()) -> None:
    """``write(f)`` into a temporary binary file beside ``out``, renamed to ``out`` once it
    returns: an exception, SIGINT or SIGTERM removes the temporary and leaves any previous
    ``out`` whole. Checks ``out`` first (:func:`check_output_path`). ``out`` gets the mode
    ``open()`` would give it (the old file's, or ``0o666 & ~umask``); OS errors (a full
    disk, ...) become UnwritableOutput."""
    check_output_path(out, inputs)
    directory, name = osp.split(osp.abspath(out))
    mode = stat.S_IMODE(os.stat(out).st_mode) if osp.exists(out) else _new_file_mode()
    try:
        with _signals_raise():
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=directory)
            try:
                with os.fdopen(fd, 'wb') as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
                os.replace(tmp, out)  # a link at ``out`` is replaced, not the file it points to
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as err:
        raise _unwritable(out, err) from err


def save_atomic(obj, out: str, inputs=()) -> None:
    """``torch.save(obj)`` to ``out`` by :func:`write_atomic`."""
    write_atomic(out, lambda f: torch.save(obj, f), inputs)


def _unwritable(out: str, err: OSError) -> UnwritableOutput:
    """The one line naming ``out`` and the OS's reason."""
    return UnwritableOutput(f'cannot write {out!r}: {err.strerror or err}')


def _new_file_mode() -> int:
    """The mode ``open(path, 'w')`` gives a new file: ``0o666 & ~umask``."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class _Signalled(BaseException):
    """SIGINT or SIGTERM during a write (a BaseException: ``except Exception`` lets it by)."""


@contextlib.contextmanager
def _signals_raise():
    """In the block, SIGINT and SIGTERM raise :class:`_Signalled`, so that cleanup code runs;
    after it the previous handlers are back and the signal is sent again to them (by
    default SIGTERM ends the process, SIGINT raises KeyboardInterrupt); InterruptedError if
    they return. Ignored signals stay ignored; outside the main thread nothing changes."""
    def handler(signum, frame):
        raise _Signalled(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # the one that can set them
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                previous[sig] = signal.signal(sig, handler)
    received = None
    try:
        yield
    except _Signalled as err:
        received = err.args[0]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if received is not None:
        signal.raise_signal(received)
        raise InterruptedError(errno.EINTR, f'interrupted by {signal.Signals(received).name}')


def load_model(config, checkpoint=None, cfg_options=None, strict=False):
    """``(model, cfg, checkpoint)`` from a config file and optionally a checkpoint file.

    ``config`` is required (BadValue if None, :data:`CONFIG_NEEDED`). The model is built in
    the config's ``default_scope`` (mmdet if unset), without ``init_weights``; the
    checkpoint's ``state_dict`` is loaded into it (``strict`` as in ``load_state_dict``;
    otherwise mismatches are logged). ``checkpoint`` in the result is the loaded
    checkpoint dict (or None).
    """
    if config is None:
        raise BadValue(CONFIG_NEEDED)
    cfg = read_config(config, cfg_options)  # MissingInput if absent
    if checkpoint is not None and not osp.isfile(checkpoint):
        raise MissingInput(f'checkpoint file not found: {checkpoint!r}')
    check_norm_types(cfg.get('model', {}))
    ckpt = None
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    if ckpt is not None:
        try:
            result = model.load_state_dict(ckpt.get('state_dict', ckpt), strict=strict)
        except RuntimeError as err:  # strict: missing/unexpected keys or other shapes
            first = str(err).splitlines()[1:3]
            raise BadValue(f'checkpoint {checkpoint!r} does not fit the model of {config!r}: '
                           + ' '.join(line.strip() for line in first)[:600]) from err
        if result.missing_keys or result.unexpected_keys:
            print_log(f'checkpoint/model mismatch: missing {result.missing_keys}, '
                      f'unexpected {result.unexpected_keys}', logger='current',
                      level=logging.WARNING)
    return model, cfg, ckpt

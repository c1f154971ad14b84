"""Checkpoint reading and writing for the tools: a model from a config and/or checkpoint,
and outputs that never replace an input and never exist half-written.

Checkpoints are read with torch's safe ``weights_only`` loading (see
``mmdet_bnplug.patches.safe_loading`` for the few classes mmengine's checkpoints add).
"""
import logging
import os
import os.path as osp
import tempfile

from cli import BadValue, MissingInput

import torch
from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import MODELS, DefaultScope

from run_config import check_norm_types


def check_output_path(out: str, inputs) -> None:
    """ValueError if ``out`` is, or resolves to (symlinks, hard links), one of ``inputs``."""
    real_out = osp.realpath(out)
    for path in inputs:
        if path is None:
            continue
        same = real_out == osp.realpath(path) or (
            osp.exists(out) and osp.exists(path) and osp.samefile(out, path))
        if same:
            raise BadValue(f'output {out!r} is the input {path!r} (or a link to it): '
                             'choose another output path')


def save_atomic(obj, out: str, inputs=()) -> None:
    """``torch.save(obj)`` to ``out`` through a temporary file in the same directory,
    renamed into place: an interrupted write never leaves a partial file under ``out``.
    Refuses (ValueError) when ``out`` is one of ``inputs``."""
    check_output_path(out, inputs)
    directory = osp.dirname(osp.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(out) + '.', suffix='.tmp',
                               dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)  # a link at ``out`` is replaced, not the file it points to
    except BaseException:
        if osp.exists(tmp):
            os.unlink(tmp)
        raise


def load_model(config=None, checkpoint=None, cfg_options=None, strict=False):
    """``(model, cfg, checkpoint)`` from a config file and/or a checkpoint file.

    Without ``config``, the config mmengine's Runner stores in the checkpoint
    (``meta['cfg']``) is used. The model is built in the config's ``default_scope``
    (mmdet if unset), without ``init_weights``; the checkpoint's ``state_dict`` is loaded
    into it (``strict`` as in ``load_state_dict``; otherwise mismatches are logged).
    ``checkpoint`` in the result is the loaded checkpoint dict (or None).
    """
    ckpt = None
    if checkpoint is not None:
        if not osp.isfile(checkpoint):
            raise MissingInput(f'checkpoint file not found: {checkpoint!r}')
        ckpt = torch.load(checkpoint, map_location='cpu', weights_only=True)
    if config is not None:
        if not osp.isfile(config):
            raise MissingInput(f'config file not found: {config!r}')
        cfg = Config.fromfile(config)
    elif ckpt is not None and 'cfg' in ckpt.get('meta', {}):
        cfg = Config.fromstring(ckpt['meta']['cfg'], file_format='.py')
    else:
        raise BadValue('a config is needed: none given and the checkpoint stores none '
                         "(meta['cfg'])")
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    check_norm_types(cfg.get('model', {}))
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    if ckpt is not None:
        result = model.load_state_dict(ckpt.get('state_dict', ckpt), strict=strict)
        if result.missing_keys or result.unexpected_keys:
            print_log(f'checkpoint/model mismatch: missing {result.missing_keys}, '
                      f'unexpected {result.unexpected_keys}', logger='current',
                      level=logging.WARNING)
    return model, cfg, ckpt

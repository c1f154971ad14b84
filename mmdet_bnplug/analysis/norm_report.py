"""Is my BN really frozen? A table of every BN-like layer, and which statistics moved.

Shared by ``tools/inspect_norms.py`` and :class:`~mmdet_bnplug.engine.hooks.NormEvalCheckHook`.
"""
import fnmatch

import torch
from torch import nn

from ..layers.norm_eval import enforced_by, settle_norm_eval
from ..utils.bn_like import bn_like_layers, layer_state


def frozen_by_type(layer: nn.Module) -> bool:
    """Layers whose statistics cannot move in any mode: EvalBN and mmdet's FrozenBN."""
    from mmdet.models.layers import FrozenBatchNorm2d

    from ..layers.eval_bn import EvalBN
    return isinstance(layer, (EvalBN, FrozenBatchNorm2d))


def frozen_layers(model: nn.Module, include=()) -> dict:
    """``{name: why}`` for the BN-like layers whose statistics are meant to stay frozen.

    ``why`` is the layer type (EvalBN, FrozenBN), ``norm_eval of <module>`` for layers
    below a module whose ``norm_eval`` is set (mmdet backbones, ``NormEval``), who
    enforces it for layers frozen by name (``FreezeNormsHook``, ``apply_norm_eval``), or
    ``include`` for names matching one of the ``include`` glob patterns.
    """
    owner_of = {}
    for owner, module in model.named_modules():
        if getattr(module, 'norm_eval', False):
            for sub in module.modules():
                owner_of.setdefault(id(sub), owner or '<model>')
    frozen = {}
    for name, layer in bn_like_layers(model):
        owner = owner_of.get(id(layer))
        if frozen_by_type(layer):
            frozen[name] = type(layer).__name__
        elif owner is not None:
            frozen[name] = f'norm_eval of {owner}'
        elif enforced_by(layer) is not None:
            frozen[name] = enforced_by(layer)
        elif any(fnmatch.fnmatchcase(name, p) for p in include):
            frozen[name] = 'include'
    return frozen


def snapshot_norms(model: nn.Module) -> dict:
    """``{name: {buffer: copy}}`` for every BN-like layer: the state that must not move."""
    return {name: layer_state(layer) for name, layer in bn_like_layers(model)}


def changed_buffers(layer: nn.Module, before: dict) -> dict:
    """``{buffer: largest absolute change}`` for the layer's buffers that differ from ``before``."""
    now = layer_state(layer)
    return {k: (now[k].double() - v.double()).abs().max().item()
            for k, v in before.items() if not torch.equal(now[k], v)}


def moved_norms(model: nn.Module, before: dict) -> dict:
    """``{name: {buffer: largest absolute change}}`` for layers whose buffers changed."""
    moved = {}
    for name, layer in bn_like_layers(model):
        changes = changed_buffers(layer, before.get(name, {}))
        if changes:
            moved[name] = changes
    return moved


COLUMNS = ('Columns: training = the layer\'s training flag after model.train(); affine = '
           'trainable/frozen (requires_grad of weight and bias), partial, buffers (mmdet '
           'FrozenBN) or none; frozen = why the layer is meant to be frozen (its type, '
           'the norm_eval of a parent module, or an include pattern); mean|m| = mean of '
           '|running_mean|; mean v = mean of running_var (MABN: the second moment); '
           'batches = num_batches_tracked; moved = no, or yes with the largest absolute '
           'change of any running statistic (or "counter" if only num_batches_tracked '
           'changed).')


def _moved_cell(changes):
    """'no', or the largest change of a float statistic (or the counter that moved)."""
    if not changes:
        return 'no'
    stats = {k: v for k, v in changes.items() if k != 'num_batches_tracked'}
    return f'yes ({max(stats.values()):.2g})' if stats else 'yes (counter)'


def _affine(layer):
    params = list(layer.parameters(recurse=False))
    if not params:
        return 'buffers' if getattr(layer, 'weight', None) is not None else 'none'
    grads = {p.requires_grad for p in params}
    return 'partial' if len(grads) > 1 else ('trainable' if grads.pop() else 'frozen')


def norm_table(model: nn.Module, moved=None) -> list:
    """One dict per BN-like layer: name, type, training, affine, frozen (why), statistics.

    ``affine`` is ``trainable``/``frozen`` (requires_grad of weight and bias),
    ``partial``, ``buffers`` (mmdet FrozenBN) or ``none``; ``mean|m|`` and ``mean v``
    average ``|running_mean|`` and ``running_var``; ``moved`` (if ``moved``, the result
    of :func:`moved_norms`, is given) is ``no`` or ``yes`` with the largest change.
    """
    frozen = frozen_layers(model)
    rows = []
    for name, layer in bn_like_layers(model):
        mean, var = getattr(layer, 'running_mean', None), getattr(layer, 'running_var', None)
        count = getattr(layer, 'num_batches_tracked', None)
        row = {'name': name or '<model>', 'type': type(layer).__name__,
               'training': layer.training, 'affine': _affine(layer),
               'frozen': frozen.get(name, ''),
               'mean|m|': '-' if mean is None else f'{mean.abs().mean().item():.4g}',
               'mean v': '-' if var is None else f'{var.float().mean().item():.4g}',
               'batches': '-' if count is None else int(count)}
        if moved is not None:
            row['moved'] = _moved_cell(moved.get(name))
        rows.append(row)
    return rows


def format_norm_table(rows) -> str:
    """The rows of :func:`norm_table` as an aligned text table."""
    if not rows:
        return '(no BN-like layers)'
    keys = list(rows[0])
    cells = [keys] + [[str(row[k]) for k in keys] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(keys))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, '  '.join('-' * w for w in widths))
    return '\n'.join(lines)


def inspect_norms(model: nn.Module, train_step=None, iters: int = 0) -> str:
    """A report on every BN-like layer of ``model``, as the training loop leaves it.

    Calls ``model.train()`` first (what a training loop does, so ``norm_eval`` takes
    effect). With ``train_step`` (a callable running one training iteration) and
    ``iters > 0``, runs it ``iters`` times and reports which layers' statistics moved.
    """
    model.train()
    settle_norm_eval(model)  # what each enforced layer's pre-hook does at its next forward
    moved = None
    if train_step is not None and iters > 0:
        before = snapshot_norms(model)
        for _ in range(iters):
            train_step()
        moved = moved_norms(model, before)
    rows = norm_table(model, moved)
    n = len(rows)
    summary = [f'{n} BN-like layers after model.train(): '
               f'{sum(not r["training"] for r in rows)} in eval mode, '
               f'{sum(r["affine"] == "trainable" for r in rows)} with trainable affine, '
               f'{sum(bool(r["frozen"]) for r in rows)} meant to be frozen.']
    if moved is not None:
        broken = [r['name'] for r in rows if r['frozen'] and r['moved'] != 'no']
        verdict = (f'meant to be frozen but moved: {", ".join(broken)}' if broken else
                   'every layer meant to be frozen stayed frozen.'
                   if any(r['frozen'] for r in rows) else 'no layer is meant to be frozen.')
        summary.append(f'After {iters} training iteration(s) the statistics of {len(moved)} '
                       f'of {n} layers moved; {verdict}')
    return format_norm_table(rows) + '\n' + '\n'.join(summary)

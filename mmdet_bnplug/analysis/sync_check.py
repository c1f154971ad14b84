"""Does synchronised training over N ranks equal one process on the concatenated batch?

One training step of a detector, from the same weights on the same global batch, run as
N gloo processes x b images (the config's norms; the gradients averaged as DDP averages
them) and as 1 process x N*b images (there PortableSyncBN is plain BN), compared part by
part: each norm layer's output and running statistics, the losses, and the gradients of
each top-level part (backbone, neck, heads). The first place where they part and its
likely cause are named (:func:`diagnose`). ``tools/check_sync.py`` is the command line.
"""
import contextlib
import io
import math
import os
import os.path as osp
import tempfile
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
from mmengine.logging import MMLogger
from mmengine.registry import DATASETS, FUNCTIONS, MODELS, init_default_scope
from mmengine.runner.utils import set_random_seed
from torch import nn

from ..engine.hooks.global_loss_norm import global_loss_norm, loss_norm_report
from ..testing.gloo import run_gloo
from ..utils.bn_like import is_bn_like
from ..utils.outputs import relative_change

_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)
_STATISTICS = ('running_mean', 'running_var')
HOOK = 'GlobalLossNormHook'


@dataclass
class StepRecord:
    """What one training step of one process produced.

    ``input_shape``: the padded batch ``(n, 3, H, W)``; ``norms``: per norm layer (forward
    order) its output on this process's images and its running statistics after the
    step; ``losses``: the parsed loss terms (floats); ``grads``: parameter gradients.
    """
    input_shape: tuple
    norms: dict = field(default_factory=dict)
    losses: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    trained: dict = field(default_factory=dict)  # state_dict after the optimizer steps


def uses_fix(cfg) -> bool:
    """Whether the config trains with ``GlobalLossNormHook`` in ``custom_hooks``."""
    return any(h.get('type') == HOOK for h in cfg.get('custom_hooks', []))


def build_model(cfg, state_dict=None, double=False):
    """The config's model in training mode (``init_weights`` then ``state_dict`` if
    given), float64 if ``double``, with the config's loss-normaliser fix applied."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if state_dict is None:
        model.init_weights()
    else:
        model.load_state_dict(state_dict, strict=True)
    if double:
        model.double()
    if uses_fix(cfg):
        global_loss_norm(model, strict=False)
    return model.train()


def global_batch(cfg, size: int, seed: int):
    """``size`` images of the config's train dataset (a seeded random choice), through
    its pipeline and its dataloader's collate function, drawn in this process after
    seeding every RNG with ``seed``: any process, distributed or not, that calls this
    with the same arguments gets the same images and augmentations (a dataloader's
    sampler would give each rank its own share instead)."""
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    loader = cfg.train_dataloader
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints while loading
        dataset = DATASETS.build(loader.dataset)
    if len(dataset) < size:
        raise ValueError(f'the train dataset has {len(dataset)} images, fewer than the '
                         f'global batch {size}')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    set_random_seed(seed)
    items = [dataset[int(i)] for i in order[:size]]
    collate = dict(loader.get('collate_fn', dict(type='pseudo_collate')))
    return partial(FUNCTIONS.get(collate.pop('type')), **collate)(items)


def quiet_logs() -> None:
    """Make mmengine's current logger one that prints warnings and errors only (weight
    initialisation and dataset loading log at INFO)."""
    MMLogger.get_instance('bnplug_check_sync', log_level='WARNING')


def batch_slice(batch: dict, start: int, stop: int) -> dict:
    """Images ``start:stop`` of a dataloader batch (its lists sliced alike)."""
    return {k: v[start:stop] for k, v in batch.items()}


def norm_layers(model):
    """``(name, layer)`` of every normalisation layer: BN-like, GN, LN, IN."""
    return [(n, m) for n, m in model.named_modules()
            if is_bn_like(m) or isinstance(m, _NORM_TYPES)]


def training_step(model, batch: dict, double=False) -> StepRecord:
    """One forward + backward of ``model`` on ``batch`` (no optimizer step)."""
    record = {}

    def keep(name, output) -> None:  # returns None: the layer's output stays as it is
        record.setdefault(name, output.detach().clone())
    handles = [layer.register_forward_hook(
        lambda mod, args, out, name=name: keep(name, out)) for name, layer in norm_layers(model)]
    try:
        model.zero_grad(set_to_none=True)
        input_shape, log_vars = _loss_backward(model, batch, double)
    finally:
        for handle in handles:
            handle.remove()
    layers = dict(norm_layers(model))
    norms = {}
    for name, output in record.items():
        stats = {k: getattr(layers[name], k).detach().clone() for k in _STATISTICS
                 if getattr(layers[name], k, None) is not None}
        norms[name] = dict(output=output, **stats)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    losses = {k: float(v.detach()) if torch.is_tensor(v) else float(v)
              for k, v in log_vars.items() if 'loss' in k}  # not accuracies
    return StepRecord(input_shape, norms, losses, grads)


def _loss_backward(model, batch: dict, double: bool):
    """Preprocess ``batch`` (its inputs float64 if ``double``), compute the parsed loss
    and backpropagate it: ``(padded input shape, log_vars)``."""
    data = model.data_preprocessor(batch, True)
    if double:
        data['inputs'] = data['inputs'].double()
    loss, log_vars = model.parse_losses(model(**data, mode='loss'))
    loss.backward()
    return tuple(data['inputs'].shape), log_vars


def optimizer_steps(model, cfg, batch_size: int, seed: int, steps: int, double=False) -> dict:
    """``steps`` training iterations with the config's optimizer wrapper (gradient
    clipping included; the learning rate at its base value, no scheduler), each on the
    next global batch (seeds ``seed + 1``, ...) or, in a process group, this rank's slice
    of it with the gradients averaged over the ranks as DDP averages them. The
    state_dict after them (floating-point entries)."""
    from mmengine.optim import build_optim_wrapper
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    per_rank = batch_size // world
    for step in range(steps):
        batch = global_batch(cfg, batch_size, seed + 1 + step)
        optim_wrapper.zero_grad()
        _loss_backward(model, batch_slice(batch, rank * per_rank, (rank + 1) * per_rank),
                       double)
        if world > 1:
            for param in model.parameters():
                if param.grad is not None:
                    dist.all_reduce(param.grad)
                    param.grad /= world
        optim_wrapper.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if v.dtype.is_floating_point}


def _input_checksum(batch) -> float:
    return float(sum(img.double().sum() for img in batch['inputs']))


def _rank_step(rank, world_size, cfg, weights_path, batch_size, seed, double, checksum,
               steps):
    """One rank's step on its slice of the global batch, then ``steps`` optimizer steps
    (run by :func:`run_sync_check`)."""
    quiet_logs()
    model = build_model(cfg, torch.load(weights_path, map_location='cpu',
                                        weights_only=True), double)
    batch = global_batch(cfg, batch_size, seed)
    if _input_checksum(batch) != checksum:
        raise RuntimeError('check_sync: this process drew other images than the first '
                           '(the dataloader is not deterministic under a fixed seed)')
    per_rank = batch_size // world_size
    record = training_step(model, batch_slice(batch, rank * per_rank,
                                              (rank + 1) * per_rank), double)
    if steps:
        record.trained = optimizer_steps(model, cfg, batch_size, seed, steps, double)
    return record


def run_sync_check(cfg, procs: int, batch_size: int, seed=0, double=False, timeout=1800,
                   steps=0):
    """``(reference, ranks)``: the 1-process step on ``batch_size`` images and the
    ``procs`` gloo ranks' steps on ``batch_size // procs`` images each, from the same
    initial weights and the same global batch; then, both ways, ``steps`` optimizer
    steps on the next global batches (:func:`optimizer_steps`)."""
    if procs < 2 or batch_size % procs:
        raise ValueError(f'procs={procs} must be >= 2 and divide the global batch '
                         f'{batch_size}')
    batch = global_batch(cfg, batch_size, seed)
    model = build_model(cfg, double=False)
    with tempfile.TemporaryDirectory() as tmp:
        weights = osp.join(tmp, 'weights.pth')
        torch.save(model.state_dict(), weights)
        one = build_model(cfg, model.state_dict(), double)
        reference = training_step(one, batch, double)
        if steps:
            reference.trained = optimizer_steps(one, cfg, batch_size, seed, steps, double)
        threads = max(1, (os.cpu_count() or 1) // procs)
        ranks = run_gloo(_rank_step, procs, args=(cfg, weights, batch_size, seed, double,
                                                  _input_checksum(batch), steps),
                         timeout=timeout, pg_timeout=timeout, threads=threads)
    return reference, ranks


def _part(param_name: str) -> str:
    return param_name.split('.', 1)[0]


@dataclass
class Comparison:
    """Relative differences, ranks against the reference: ``shapes`` per rank and the
    reference's; ``norms`` name -> {'output'|'running_mean'|'running_var': diff} (None
    where shapes differ); ``losses`` name -> (ranks' mean, reference, diff); ``grads``
    part -> diff of the DDP-averaged gradient; ``trained`` part -> worst diff over the
    ranks of the weights and buffers after the optimizer steps (empty without)."""
    rank_shapes: list
    reference_shape: tuple
    norms: dict
    losses: dict
    grads: dict
    trained: dict = field(default_factory=dict)


def compare(reference: StepRecord, ranks: list) -> Comparison:
    """Rank records (in rank order) against the one-process reference."""
    norms = {}
    for name, ref in reference.norms.items():
        row = {}
        outputs = [r.norms[name]['output'] for r in ranks if name in r.norms]
        same = len(outputs) == len(ranks) and all(
            o.shape[1:] == ref['output'].shape[1:] for o in outputs)
        row['output'] = relative_change(torch.cat(outputs), ref['output']) if same and \
            sum(o.shape[0] for o in outputs) == ref['output'].shape[0] else None
        for key in _STATISTICS:
            if key in ref:  # every rank holds the group's statistics: compare the worst
                row[key] = max(relative_change(r.norms[name][key], ref[key]) for r in ranks)
        norms[name] = row
    losses = {}
    for name, value in reference.losses.items():
        mean = sum(r.losses.get(name, math.nan) for r in ranks) / len(ranks)
        losses[name] = (mean, value, abs(mean - value) / max(abs(value), 1e-30))
    parts = {}
    for name in reference.grads:
        parts.setdefault(_part(name), []).append(name)
    grads = {part: relative_change(
        [sum(r.grads.get(n, torch.zeros_like(reference.grads[n])) for r in ranks) / len(ranks)
         for n in names], [reference.grads[n] for n in names]) for part, names in parts.items()}
    trained = {}
    for name, value in reference.trained.items():
        diff = max(relative_change(r.trained[name], value) for r in ranks)
        trained[_part(name)] = max(trained.get(_part(name), 0.0), diff)
    return Comparison([r.input_shape for r in ranks], reference.input_shape, norms, losses,
                      grads, trained)


def _samplers(cfg):
    """Config paths of random samplers in the model's train_cfg (RPN, RoI)."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get('type') in ('RandomSampler', 'OHEMSampler', 'InstanceBalancedPosSampler',
                                    'IoUBalancedNegSampler', 'ScoreHLRSampler'):
                found.append(path)
            for key, value in node.items():
                walk(value, f'{path}.{key}')
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f'{path}[{i}]')
    walk(cfg.model.get('train_cfg', {}), 'model.train_cfg')
    return found


def diagnose(comparison: Comparison, cfg, model, rtol: float):
    """``(first, cause)``: where the two steps first part beyond ``rtol`` (None if
    nowhere) and the likely cause, both as one-line strings."""
    per_image = [s[1:] for s in comparison.rank_shapes]
    padding = any(s != comparison.reference_shape[1:] for s in per_image)
    first = None
    for name, row in comparison.norms.items():
        bad = {k: v for k, v in row.items() if v is None or v > rtol}
        if bad:
            first = f'norm layer {name}: ' + ', '.join(
                f'{k} {"shape differs" if v is None else f"{v:.2e}"}' for k, v in bad.items())
            break
    if first is None:
        for name, (_, _, diff) in comparison.losses.items():
            if not diff <= rtol:
                first = f'loss {name}: {diff:.2e}'
                break
    for what, diffs in (('gradients', comparison.grads),
                        ('weights and buffers after the optimizer steps', comparison.trained)):
        for part, diff in diffs.items():
            if first is None and not diff <= rtol:
                first = f'{what} of {part}: {diff:.2e}'
    if first is None:
        return None, None
    if padding:
        return first, ('padding to different batch shapes: the data preprocessor pads each '
                       f"rank's batch to its own largest image ({per_image} against "
                       f'{comparison.reference_shape[1:]}); pad to a fixed size, e.g. '
                       "model.data_preprocessor.batch_augments=[dict(type='BatchFixedSizePad',"
                       ' size=(H, W))]')
    if first.startswith('norm layer'):
        name = first.split(':')[0].split()[-1]
        layer = dict(norm_layers(model))[name]
        return first, (f'norm statistics: {name} is {type(layer).__name__}, whose batch '
                       'statistics are per process (use PortableSyncBN to synchronise '
                       'them, or a norm without batch statistics)')
    samplers = _samplers(cfg)
    if samplers:
        return first, ('random sampling: ' + ', '.join(samplers) + ' draw anchors/RoIs '
                       'at random per process, which no seed makes equal to one process '
                       'drawing for the whole batch (the statistics and everything before '
                       'the sampling can still be exact)')
    dropout = [n for n, m in model.named_modules()
               if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropout:
        return first, f'dropout: {dropout[:3]} draw their masks per process'
    report = loss_norm_report(model)
    per_rank = [f'{name} ({cls})' for name, cls, what in report if what == 'made global']
    if per_rank and not uses_fix(cfg):
        return first, ('loss normalisation: ' + ', '.join(per_rank) + " divide(s) each "
                       "rank's loss by the rank's own count (positive anchors, RoIs); add "
                       f"dict(type='{HOOK}') to custom_hooks")
    own = [f'{name} ({cls})' for name, cls, what in report if what == 'already global']
    worst = max([d for *_, d in comparison.losses.values()] + list(comparison.grads.values()))
    if own and worst < 1e-5:
        return first, ("mmdet's eps: " + ', '.join(own) + ' reduce_mean their normaliser '
                       'themselves and divide by mean + eps (eps = 1.2e-7, float32\'s), '
                       'which averages over N ranks to sum + N * eps: a relative '
                       'difference of about (N - 1) * eps / normaliser')
    return first, 'unknown: the norms, padding, sampling and loss normalisers agree'


def format_comparison(comparison: Comparison, rtol: float) -> str:
    """The comparison as text tables (relative differences)."""
    def flag(v):
        return 'shape differs' if v is None else f'{v:.2e}' + (' *' if v > rtol else '')
    lines = [f'padded batch per rank {comparison.rank_shapes}, one process '
             f'{comparison.reference_shape}', '',
             f'{"norm layer (forward order)":44s} {"output":>14s} {"running_mean":>14s} '
             f'{"running_var":>14s}']
    for name, row in comparison.norms.items():
        lines.append(f'{name:44s} ' + ' '.join(
            f'{flag(row[k]) if k in row else "-":>14s}'
            for k in ('output', 'running_mean', 'running_var')))
    lines += ['', f'{"loss":44s} {"ranks mean":>14s} {"one process":>14s} {"rel. diff":>14s}']
    for name, (mean, value, diff) in comparison.losses.items():
        lines.append(f'{name:44s} {mean:14.8g} {value:14.8g} {flag(diff):>14s}')
    lines += ['', f'{"gradients (DDP average), by part":44s} {"rel. L2 diff":>14s}']
    for part, diff in comparison.grads.items():
        lines.append(f'{part:44s} {flag(diff):>14s}')
    if comparison.trained:
        lines += ['', f'{"after the optimizer steps, by part":44s} {"rel. L2 diff":>14s}']
        for part, diff in comparison.trained.items():
            lines.append(f'{part:44s} {flag(diff):>14s}')
    return '\n'.join(lines)

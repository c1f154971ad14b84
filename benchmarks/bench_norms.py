"""Time and peak memory of norm layers, as ratios to nn.BatchNorm2d in the same run.

    python -m benchmarks.bench_norms [--quick] [--out-md FILE] [--out-png FILE]
        [--repeats 7] [--threads N] [--only NAME ...] [--max-numel N] [--sync-procs 2]
        [--channels-last] [--compiled]

Shapes: the BN inputs of a RetinaNet R50 backbone (pytorch style, stride in the 3x3
conv) and the FPN P3-P7 outputs, at batch 2 for an 800x1333 image padded to 800x1344
(``--quick``: the two smallest, fewer rounds; for smoke tests).
Candidates: a table of name -> layer factory (``CANDIDATES``); add a layer as one entry.

Measured per shape and layer:
- fwd+bwd: training mode, ``y = layer(x); y.backward(dy)`` with ``x`` requiring grad
  (layers without trainable parameters, e.g. mmdet's FrozenBN, give the input gradient);
- eval forward: ``layer.eval()`` under ``torch.no_grad()``;
- peak memory of one fwd+bwd.

Time: candidates run interleaved (round robin, order rotated each round), each sample
timing enough calls for ~50 ms; the median over ``--repeats`` rounds is divided by
BatchNorm2d's median of the same run (training mode for fwd+bwd, eval mode for the eval
forward), so machine load largely cancels out. Entries with ``held_to`` are also divided
by another entry: EvalBN is held to nn.BatchNorm2d kept in eval mode (``BN eval``).

Peak memory: the torch profiler's allocator events (``profile_memory=True``) give every
CPU tensor allocation and free in time order; the peak of their running sum during one
forward+backward is the extra memory the step needs on top of its inputs (the layer,
``x``, ``dy``), counting the output, saved tensors, temporaries and ``x.grad``. This is
exact, works on CPU, and is independent of the malloc's caching and of other processes.
(The profiler may warn once about a block "allocated before the profiling started": a
layer freeing its previous step's per-channel tensors, too small to matter. Kineto's
lines on every profiler start and stop are silenced: ``KINETO_LOG_LEVEL`` defaults to 6,
above its highest level; set it lower to see them.)

PortableSyncBN in this process has no process group: it is plain BN. Its synchronised
path has its own table: ``--sync-procs`` (default 2) gloo processes on this machine,
each with the shape above as its per-rank batch, time PortableSyncBN against
nn.BatchNorm2d on the same per-rank shape in the same processes (interleaved as above,
the same number of calls on every rank), with ``--threads / --sync-procs`` threads each,
and compare peak memory as above. It also counts the collectives of one call from the
profiler's backend events (``gloo:*``), forward and backward apart.

``--compiled``: each layer of ``COMPILED`` also runs as ``torch.compile(layer,
fullgraph=True, dynamic=True)`` (inductor), interleaved with the rest; its fwd+bwd is
divided by the same layer's eager fwd+bwd. The first call of each (untimed) compiles; a
layer recompiles per channel count (dynamo specialises integer module attributes).

Output: markdown tables (printed, and written to ``--out-md``) and a PNG of the ratios
per shape (``--out-png``).
"""
import os
import statistics
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_utils import (
    DEFAULT_REPEATS,
    benchmark_parser,
    grouped_bars,
    interleaved_medians,
    markdown_table,
    pyplot,
    run_info,
    run_on_gloo,
    save_figure,
    write_text,
)
from mmdet_bnplug.layers.eval_bn import EvalBN
from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.layers.portable_sync_bn import PortableSyncBN
from mmdet_bnplug.ops import mabn as mabn_ops
from mmdet_bnplug.testing.mabn_reference import SpecMABN

# (label, shape): every distinct BN input shape of RetinaNet R50 + FPN at batch 2
SHAPES = [
    ('stem', (2, 64, 400, 672)),
    ('layer1 64', (2, 64, 200, 336)),
    ('layer1 256', (2, 256, 200, 336)),
    ('layer2 128 (s1)', (2, 128, 200, 336)),
    ('layer2 128', (2, 128, 100, 168)),
    ('layer2 512', (2, 512, 100, 168)),
    ('layer3 256 (s1) / P3', (2, 256, 100, 168)),
    ('layer3 256 / P4', (2, 256, 50, 84)),
    ('layer3 1024', (2, 1024, 50, 84)),
    ('layer4 512 (s1)', (2, 512, 50, 84)),
    ('layer4 512', (2, 512, 25, 42)),
    ('layer4 2048', (2, 2048, 25, 42)),
    ('P5', (2, 256, 25, 42)),
    ('P6', (2, 256, 13, 21)),
    ('P7', (2, 256, 7, 11)),
]


class NaiveMABNFunction(torch.autograd.Function):
    """The spec as the obvious chain of tensor ops: the float64 reference
    (``mmdet_bnplug.testing.mabn_reference``) on torch float64 tensors, the state in
    ``spec``; input and gradients cast to float64 and back."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec):
        ctx.spec = spec
        return spec.forward(x.double(), weight.double(), bias.double()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        dx, dw, db = ctx.spec.backward(dy.double())
        return dx.to(dy.dtype), dw.float(), db.float(), None


class NaiveMABN(nn.Module):
    """The reference's state as a layer (hyper-parameters as MABN's)."""

    def __init__(self, c, buffer_size, warmup_iters, renorm_iters, r_max=5.0,
                 momentum=0.02, eps=1e-5):
        super().__init__()
        self.spec = SpecMABN(c, buffer_size, warmup_iters, renorm_iters, r_max, momentum,
                             eps, xp=torch)
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        if not self.training:
            w, b = self.weight.detach().double(), self.bias.detach().double()
            return self.spec.eval(x.double(), w, b).to(x.dtype)
        return NaiveMABNFunction.apply(x, self.weight, self.bias, self.spec)


# MABN layers start past warm-up with renorm on: the steady state, every step's path
STEADY = dict(buffer_size=16, warmup_iters=0, renorm_iters=0)


class _PyTorchStepFunction(torch.autograd.Function):
    """MABN's training step by the ops' PyTorch implementation (ops/mabn.py), called
    directly: its arithmetic, without the dispatcher (the C++ kernels own the CPU key)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        coeffs, step = mabn_ops.train_stats_pytorch(
            x, layer.running_var, layer.num_batches_tracked, layer.buffer_x2, layer.eps,
            layer.momentum, layer.r_max, layer.warmup_iters, layer.renorm_iters)
        ctx.save_for_backward(x, weight, coeffs, step)
        ctx.layer = layer
        return mabn_ops.train_affine_pytorch(x, weight, bias, coeffs, step, layer.buffer_gz,
                                             layer.warmup_iters)

    @staticmethod
    def backward(ctx, dy):
        x, weight, coeffs, step = ctx.saved_tensors
        layer = ctx.layer
        dx, dw, db = mabn_ops.train_backward_pytorch(dy, x, weight, coeffs, step,
                                                     layer.buffer_gz, layer.warmup_iters,
                                                     [True, True, True])
        return dx, dw, db, None


class _MABNPyTorchStep(MABN):
    """MABN on the PyTorch implementation of its ops on CPU as well: that of every other
    device and of an install without the compiled CPU kernels."""

    def _train_step(self, x):
        return _PyTorchStepFunction.apply(x, self.weight, self.bias, self)


def _steady_mabn(cls):
    """Factory of ``cls`` layers in the steady state."""
    def factory(c):
        layer = cls(c, **STEADY)
        layer.num_batches_tracked.fill_(1000)
        return layer
    return factory


def _naive_mabn(c):
    layer = NaiveMABN(c, **STEADY)
    layer.spec.t = 1000
    return layer


class _BatchNorm2dEval(nn.BatchNorm2d):
    """nn.BatchNorm2d kept in eval mode (frozen statistics): what EvalBN is held to."""

    def train(self, mode=True):
        return super().train(False)


def _frozen_affine(factory):
    """The layer with requires_grad=False on weight and bias (norm_cfg requires_grad=False)."""
    return lambda c: factory(c).requires_grad_(False)


def _frozen_bn(c):
    # imported here: mmdet.models takes seconds to import, the sync workers don't need it
    from mmdet.models.layers.brick_wrappers import FrozenBatchNorm2d
    return FrozenBatchNorm2d(c)


@dataclass(frozen=True)
class Candidate:
    """A layer to measure: ``factory(num_features) -> layer``.

    ``held_to``: other entries its fwd+bwd is also compared with (time and memory).
    ``eval_forward``: False when its eval forward is another entry's (not timed twice).
    ``frozen``: a frozen-statistics layer (plotted beside the other frozen ones).
    """
    factory: Callable[[int], nn.Module]
    held_to: Tuple[str, ...] = ()
    eval_forward: bool = True
    frozen: bool = False


# name -> Candidate; the first entry is the baseline
CANDIDATES = {
    'BatchNorm2d': Candidate(nn.BatchNorm2d),
    'MABN': Candidate(_steady_mabn(MABN)),
    'MABN PyTorch step': Candidate(_steady_mabn(_MABNPyTorchStep), eval_forward=False),
    'MABN naive': Candidate(_naive_mabn),
    'BN eval': Candidate(_BatchNorm2dEval, eval_forward=False, frozen=True),
    'EvalBN': Candidate(EvalBN, held_to=('BN eval', ), frozen=True),
    'BN eval frozen': Candidate(_frozen_affine(_BatchNorm2dEval), eval_forward=False,
                                frozen=True),
    'EvalBN frozen': Candidate(_frozen_affine(EvalBN), held_to=('BN eval frozen', 'BN eval'),
                               eval_forward=False, frozen=True),
    'PortableSyncBN': Candidate(PortableSyncBN),
    'FrozenBN': Candidate(_frozen_bn, frozen=True),
    'GroupNorm': Candidate(lambda c: nn.GroupNorm(32, c)),
}
# targets the docs quote: (what, ratio kind, layer, reference, bound)
TARGETS = [('MABN fwd+bwd time / BN', 'time', 'MABN', 'BatchNorm2d', 1.25),
           ('MABN peak memory / BN', 'mem', 'MABN', 'BatchNorm2d', 1.1),
           ('EvalBN fwd+bwd time / BN eval', 'time', 'EvalBN', 'BN eval', 1.0),
           ('EvalBN frozen fwd+bwd time / BN eval frozen', 'time', 'EvalBN frozen',
            'BN eval frozen', 1.0)]
# --compiled: these layers also run under torch.compile (inductor, fullgraph, dynamic
# shapes), timed against their own eager fwd+bwd
COMPILED = ('BatchNorm2d', 'MABN', 'EvalBN', 'EvalBN frozen', 'PortableSyncBN', 'FrozenBN',
            'GroupNorm')
QUICK = dict(max_numel=150_000, repeats=3, target_s=0.01)
# kineto (read when the profiler first starts) logs each start and stop on stderr
os.environ.setdefault('KINETO_LOG_LEVEL', '6')


def _step(layer, x, dy):
    x.grad = None
    layer(x).backward(dy)


def peak_bytes(layer, x, dy) -> int:
    """Peak extra tensor memory of one forward+backward (see module docstring)."""
    _step(layer, x, dy)  # first call outside: lazily created .grad tensors
    x.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(layer, x, dy)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def train_times(layers, x, dy, repeats, target_s) -> dict:
    """Median seconds per training-mode forward+backward of each layer, interleaved."""
    steps = {n: (lambda layer=layer: _step(layer, x, dy)) for n, layer in layers.items()}
    return interleaved_medians(steps, repeats, target_s)


def eval_times(layers, x, repeats, target_s) -> dict:
    """Median seconds per eval-mode forward without autograd of each layer, interleaved."""
    x = x.detach()

    def forward(layer):
        with torch.no_grad():
            layer(x)

    for layer in layers.values():
        layer.eval()
    steps = {n: (lambda layer=layer: forward(layer)) for n, layer in layers.items()}
    return interleaved_medians(steps, repeats, target_s)


def collectives_per_call(layer, x, dy):
    """(forward, backward) number of backend collectives (profiler events gloo:*, nccl:*)."""
    def count(prof):
        return sum(e.name.startswith(('gloo:', 'nccl:')) for e in prof.events())

    x.grad = None
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        y = layer(x)
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        y.backward(dy)
    return count(forward), count(backward)


class _Collectives(torch.autograd.Function):
    """Identity on ``y`` whose forward and backward all_gather as many values as
    PortableSyncBN's two collectives carry for ``c`` channels (count, mean, M2; sum(dy),
    sum(dy * xhat))."""

    @staticmethod
    def forward(ctx, y, c):
        local = y.new_zeros(1, 2 * c + 1)
        dist.all_gather_into_tensor(y.new_empty(dist.get_world_size(), 2 * c + 1), local)
        ctx.c = c
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        dist.all_gather_into_tensor(dy.new_empty(dist.get_world_size(), 2 * ctx.c),
                                    dy.new_zeros(1, 2 * ctx.c))
        return dy, None


class BNPlusCollectives(nn.BatchNorm2d):
    """Local BN followed by PortableSyncBN's collectives (same sizes, results unused): the
    floor of any synchronised BN built on local BN's kernels."""

    def forward(self, x):
        return _Collectives.apply(super().forward(x), self.num_features)


def _sync_worker(rank, world_size, shapes, repeats, target_s):
    """Per shape: BN ms, PortableSyncBN time and memory ratios, collectives per call, the
    floor (BN plus the collectives) and one round trip of the two collectives alone."""
    rows = []
    for _, shape in shapes:
        torch.manual_seed(rank)
        x, dy = torch.randn(shape).requires_grad_(), torch.randn(shape)
        c = shape[1]
        layers = {'BatchNorm2d': nn.BatchNorm2d(c), 'PortableSyncBN': PortableSyncBN(c),
                  'floor': BNPlusCollectives(c)}
        steps = {n: (lambda layer=layer: _step(layer, x, dy)) for n, layer in layers.items()}
        buffers = [(torch.empty(world_size, k), torch.zeros(1, k)) for k in (2 * c + 1, 2 * c)]
        steps['collectives'] = lambda: [dist.all_gather_into_tensor(*b) for b in buffers]
        times = interleaved_medians(steps, repeats, target_s, across_ranks=True)
        peaks = {n: peak_bytes(layers[n], x, dy) for n in ('BatchNorm2d', 'PortableSyncBN')}
        bn = times['BatchNorm2d']
        rows.append(dict(bn_ms=bn * 1e3, time=times['PortableSyncBN'] / bn,
                         floor=times['floor'] / bn,
                         over_floor=times['PortableSyncBN'] / times['floor'],
                         collectives_ms=times['collectives'] * 1e3,
                         mem=peaks['PortableSyncBN'] / peaks['BatchNorm2d'],
                         collectives=collectives_per_call(layers['PortableSyncBN'], x, dy)))
    return rows


def measure_shape(shape, names, repeats, target_s, memory_format, compiled=False):
    """Ratios of every named candidate on one shape (see module docstring); ``compiled``:
    also the fwd+bwd of each ``COMPILED`` layer under torch.compile over its eager one."""
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_()
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    layers = {n: CANDIDATES[n].factory(shape[1]).train() for n in names}
    compiled_names = [n for n in names if compiled and n in COMPILED]
    timed = dict(layers, **{
        f'{n} compiled': torch.compile(CANDIDATES[n].factory(shape[1]).train(),
                                       fullgraph=True, dynamic=True)
        for n in compiled_names})
    base = names[0]
    times = train_times(timed, x, dy, repeats, target_s)
    peaks = {n: peak_bytes(layer, x, dy) for n, layer in layers.items()}
    evals = eval_times({n: layers[n] for n in names if CANDIDATES[n].eval_forward},
                       x, repeats, target_s)
    return dict(
        bn_ms=times[base] * 1e3, bn_eval_ms=evals[base] * 1e3, bn_mb=peaks[base] / 2**20,
        time={n: times[n] / times[base] for n in names[1:]},
        mem={n: peaks[n] / peaks[base] for n in names[1:]},
        eval={n: evals[n] / evals[base] for n in names[1:] if n in evals},
        compiled={n: times[f'{n} compiled'] / times[n] for n in compiled_names},
        held={(n, ref): (times[n] / times[ref], peaks[n] / peaks[ref])
              for n in names for ref in CANDIDATES[n].held_to if ref in layers})


def _median_worst(values):
    values = [v for v in values if v is not None]
    return (statistics.median(values), max(values)) if values else (None, None)


def _shape_cells(label, shape):
    return [label, 'x'.join(map(str, shape))]


def report(shapes, results, names, sync, procs, info) -> str:
    """The markdown report: summary, targets, per-shape tables, the sync table."""
    sync_name = f'PortableSyncBN x{procs}'
    for res, srow in zip(results, sync or []):
        res['time'][sync_name], res['mem'][sync_name] = srow['time'], srow['mem']
    layers = names[1:] + ([sync_name] if sync else [])
    n = len(shapes)
    out = [f'# Norm layer benchmark\n\n{info}\n',
           f'## Summary: ratio to nn.BatchNorm2d, median and worst over {n} shapes\n',
           'fwd+bwd in training mode; eval forward against nn.BatchNorm2d in eval mode; '
           'peak memory of one fwd+bwd.'
           + (f' {sync_name}: {procs} gloo processes against nn.BatchNorm2d in the same '
              'processes.' if sync else '') + '\n']
    summary = []
    for layer in layers:
        cells = [layer]
        for kind in ('time', 'eval', 'mem'):
            cells += _median_worst([r[kind].get(layer) for r in results])
        summary.append(cells)
    out.append(markdown_table(['layer', 'fwd+bwd median', 'worst', 'eval fwd median',
                               'worst', 'peak mem median', 'worst'], summary))
    held = [key for key in results[0]['held']] if results else []
    if held:
        out.append('\n## EvalBN against nn.BatchNorm2d in eval mode (fwd+bwd)\n')
        out.append(markdown_table(
            ['ratio', 'time median', 'worst', 'peak mem median', 'worst'],
            [[f'{a} / {b}', *_median_worst([r['held'][(a, b)][0] for r in results]),
              *_median_worst([r['held'][(a, b)][1] for r in results])] for a, b in held]))
    targets = []
    for what, kind, layer, ref, bound in TARGETS:
        if ref == names[0]:
            values = [r[kind].get(layer) for r in results]
        else:
            values = [r['held'].get((layer, ref), (None, None))[kind == 'mem']
                      for r in results]
        values = [v for v in values if v is not None]
        if values:
            targets.append([what, f'<= {bound}', *_median_worst(values),
                            f'{sum(v <= bound for v in values)}/{len(values)}'])
    if targets:
        out.append('\n## Targets\n')
        out.append(markdown_table(['ratio', 'target', 'median', 'worst', 'shapes within'],
                                  targets))
    for kind, title, base_col, base_key, cols in (
            ('time', 'fwd+bwd time, ratio to nn.BatchNorm2d (training mode)',
             'BN ms', 'bn_ms', layers),
            ('eval', 'eval forward time, ratio to nn.BatchNorm2d (eval mode, no_grad)',
             'BN eval ms', 'bn_eval_ms', [c for c in names[1:] if CANDIDATES[c].eval_forward]),
            ('mem', 'peak memory of one fwd+bwd, ratio to nn.BatchNorm2d',
             'BN MB', 'bn_mb', layers)):
        out.append(f'\n## {title}\n')
        out.append(markdown_table(
            ['shape', 'N,C,H,W', base_col] + cols,
            [_shape_cells(label, shape) + [res[base_key]] + [res[kind].get(c) for c in cols]
             for (label, shape), res in zip(shapes, results)]))
    compiled = list(results[0]['compiled']) if results else []
    if compiled:
        out.append('\n## torch.compile: compiled fwd+bwd / eager fwd+bwd of the same layer\n')
        out.append('inductor, `fullgraph=True`, `dynamic=True` (one compilation per channel '
                   'count), compiled and eager interleaved in the same rounds; below 1: '
                   'compiled is faster.\n')
        out.append(markdown_table(
            ['layer', 'median', 'worst', 'best'],
            [[n, *_median_worst([r['compiled'][n] for r in results]),
              min(r['compiled'][n] for r in results)] for n in compiled]))
        out.append('\n## torch.compile per shape: compiled fwd+bwd / eager fwd+bwd\n')
        out.append(markdown_table(
            ['shape', 'N,C,H,W'] + compiled,
            [_shape_cells(label, shape) + [res['compiled'][c] for c in compiled]
             for (label, shape), res in zip(shapes, results)]))
    if sync:
        out.append(f'\n## PortableSyncBN on {procs} gloo processes\n')
        out.append('Per-rank shape; ratios to nn.BatchNorm2d on that shape in the same '
                   'processes; collectives counted per call. `floor`: nn.BatchNorm2d '
                   "followed by PortableSyncBN's two collectives (same sizes), the cost of "
                   'any synchronised BN on local BN\'s kernels; `/ floor`: PortableSyncBN '
                   'over it (its own arithmetic); `collectives ms`: the two collectives '
                   'alone, one round trip.\n')
        out.append(markdown_table(
            ['shape', 'N,C,H,W per rank', 'BN ms', 'time', 'floor', '/ floor',
             'collectives ms', 'peak mem', 'collectives fwd+bwd'],
            [_shape_cells(label, shape) + [s['bn_ms'], s['time'], s['floor'],
                                            s['over_floor'], s['collectives_ms'], s['mem'],
                                            '{}+{}'.format(*s['collectives'])]
             for (label, shape), s in zip(shapes, sync)]))
        out.append('')
        out.append(markdown_table(
            ['PortableSyncBN x{}'.format(procs), 'median', 'worst'],
            [['time / BN', *_median_worst([s['time'] for s in sync])],
             ['floor / BN', *_median_worst([s['floor'] for s in sync])],
             ['time / floor', *_median_worst([s['over_floor'] for s in sync])]]))
    return '\n'.join(out) + '\n'


def plot(path, shapes, results, names, sync, procs):
    """Grouped bars per shape, ratios to nn.BatchNorm2d: rows fwd+bwd time, peak memory and
    eval forward time; columns the training-mode layers and the frozen ones. A layer has one
    colour in every panel."""
    plt = pyplot()
    sync_name = f'PortableSyncBN x{procs}'
    layers = names[1:] + ([sync_name] if sync else [])
    palette = [f'C{i}' for i in range(10)] + ['black', 'navy', 'gold']
    colors = {n: palette[i % len(palette)] for i, n in enumerate(layers)}
    frozen = [n for n in layers if n in CANDIDATES and CANDIDATES[n].frozen]
    columns = (('training-mode layers', [n for n in layers if n not in frozen]),
               ('frozen-statistics layers', frozen))
    columns = [(title, cols) for title, cols in columns if cols]
    rows = (('time', 'fwd+bwd time / BN', True, lambda n: True),
            ('mem', 'peak memory / BN', False, lambda n: True),
            ('eval', 'eval forward time / BN eval',
             True, lambda n: n in CANDIDATES and CANDIDATES[n].eval_forward))
    groups = [label for label, _ in shapes]
    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(9 * len(columns), 4.2 * len(rows)),
                             gridspec_kw=dict(hspace=0.5, wspace=0.15))
    for r, (kind, ylabel, log, shown) in enumerate(rows):
        for c, (title, cols) in enumerate(columns):
            ax = axes[r][c]
            grouped_bars(ax, groups, {n: [res[kind].get(n) for res in results]
                                      for n in cols if shown(n)},
                         ylabel, log=log, colors=colors)
            if r == 0:
                ax.set_title(title)
    for c, (_, cols) in enumerate(columns):
        axes[0][c].legend(ncol=3, fontsize=8, loc='lower left', bbox_to_anchor=(0, 1.1))
    fig.suptitle('Norm layers on RetinaNet R50-FPN shapes (batch 2), ratio to '
                 'nn.BatchNorm2d in the same run', y=1.0)
    save_figure(fig, path)


def main():
    parser = benchmark_parser(
        __doc__, f'shapes of at most {QUICK["max_numel"]} elements, {QUICK["repeats"]} '
        'rounds, short samples', list(CANDIDATES)[1:], 'the PortableSyncBN table')
    parser.add_argument('--max-numel', type=int, default=None,
                        help='skip shapes with more elements')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--compiled', action='store_true',
                        help='also time each layer under torch.compile against its eager self')
    args = parser.parse_args()
    repeats = args.repeats or (QUICK['repeats'] if args.quick else DEFAULT_REPEATS)
    max_numel = args.max_numel or (QUICK['max_numel'] if args.quick else None)
    target_s = QUICK['target_s'] if args.quick else 0.05
    torch.set_num_threads(args.threads)
    if args.compiled:
        # a layer's integer attributes (num_features, ...) are specialised: one compilation
        # per channel count, 9 over the 15 shapes, above dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    wanted = set(args.only or CANDIDATES)
    wanted |= {ref for n in wanted for ref in CANDIDATES[n].held_to}
    names = [n for i, n in enumerate(CANDIDATES) if i == 0 or n in wanted]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    shapes = [(label, shape) for label, shape in SHAPES
              if not max_numel or torch.Size(shape).numel() <= max_numel]
    if not shapes:
        parser.error(f'--max-numel {max_numel} leaves no shape')
    load_before = os.getloadavg()[0]
    results = []
    for label, shape in shapes:
        results.append(measure_shape(shape, names, repeats, target_s, fmt, args.compiled))
        print(f'{label}: done', flush=True)
    sync, threads = None, max(1, args.threads // max(1, args.sync_procs))
    procs = args.sync_procs if 'PortableSyncBN' in wanted else 0
    if procs > 1:
        sync = run_on_gloo(_sync_worker, procs, threads, shapes, repeats, target_s)
    info = run_info(args.threads, procs, threads, load_before,
                    f'median of {repeats} interleaved rounds'
                    + (', channels_last' if args.channels_last else '')
                    + (', with torch.compile' if args.compiled else ''))
    text = report(shapes, results, names, sync, procs, info)
    print(text)
    write_text(args.out_md, text)
    if args.out_png:
        plot(args.out_png, shapes, results, names, sync, procs)


if __name__ == '__main__':
    main()

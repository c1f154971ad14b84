"""Forward+backward time and peak memory of norm layers, as ratios to nn.BatchNorm2d.

    PYTHONPATH=. python benchmarks/bench_norms.py [--repeats 7] [--threads 2]
        [--only NAME ...] [--max-numel N] [--sync-procs 2]

Shapes: the BN inputs of a RetinaNet R50 backbone (pytorch style, stride in the 3x3
conv) and the FPN P3-P7 outputs, at batch 2 for an 800x1333 image padded to 800x1344.
Candidates: a table of name -> layer factory (``CANDIDATES``); add a layer as one entry.
Every layer is timed in training mode, ``y = layer(x); y.backward(dy)``.

Time: candidates run interleaved (round robin, order rotated each round), each sample
timing enough calls for ~50 ms; the median over ``--repeats`` rounds is divided by
BatchNorm2d's median of the same run, so machine load largely cancels out.

Peak memory: the torch profiler's allocator events (``profile_memory=True``) give every
CPU tensor allocation and free in time order; the peak of their running sum during one
forward+backward is the extra memory the step needs on top of its inputs (the layer,
``x``, ``dy``), counting the output, saved tensors, temporaries and ``x.grad``. This is
exact, works on CPU, and is independent of the malloc's caching and of other processes.
(The profiler may warn once about a block "allocated before the profiling started": a
layer freeing its previous step's per-channel tensors, too small to matter.)

PortableSyncBN needs a process group, so it has its own table: ``--sync-procs`` (default
2) gloo processes on this machine, each with the shape above as its per-rank batch, time
PortableSyncBN against nn.BatchNorm2d on the same per-rank shape in the same processes
(interleaved as above, the same number of calls on every rank), with
``--threads / --sync-procs`` threads each, and compare peak memory as above. It also
counts the collectives of one call from the profiler's backend events (``gloo:*``),
forward and backward apart.
"""
import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.profiler import ProfilerActivity, profile

from mmdet_bnplug.norms.mabn import MABN
from mmdet_bnplug.norms.portable_sync_bn import PortableSyncBN

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
    """The spec as the obvious chain of tensor ops (reference for the fast one)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        layer.t += 1
        t = int(layer.t.item())  # host sync, as in the reference code
        x2 = (x * x).mean(dims)
        layer.buffer_x2[t % layer.B] = x2
        use_batch = t <= layer.B or t < layer.warmup_iters
        s2 = x2 if use_batch else layer.buffer_x2.mean(0)
        std = (s2 + layer.eps).sqrt()
        z = x / std.view(shape)
        r = std / (layer.running_var + layer.eps).sqrt()
        if t <= max(layer.renorm_iters, layer.warmup_iters):
            r = torch.ones_like(r)
        else:
            r = r.clamp(1 / layer.r_max, layer.r_max)
        y = weight.view(shape) * (r.view(shape) * z) + bias.view(shape)
        layer.running_var.mul_(1 - layer.momentum).add_(layer.momentum * s2)
        ctx.save_for_backward(z, weight, r, std)
        ctx.layer, ctx.t, ctx.use_batch, ctx.dims, ctx.shape = layer, t, use_batch, dims, shape
        return y

    @staticmethod
    def backward(ctx, dy):
        z, weight, r, std = ctx.saved_tensors
        layer, dims, shape = ctx.layer, ctx.dims, ctx.shape
        g = dy * weight.view(shape) * r.view(shape)
        gz = (g * z).mean(dims)
        layer.buffer_gz[ctx.t % layer.B] = gz
        mgz = gz if ctx.use_batch else layer.buffer_gz.mean(0)
        dx = (g - z * mgz.view(shape)) / std.view(shape)
        dw = (dy * r.view(shape) * z).sum(dims)
        db = dy.sum(dims)
        return dx, dw, db, None


class NaiveMABN(nn.Module):
    """Module holding the naive implementation's state (hyper-parameters as MABN's)."""

    def __init__(self, c, buffer_size, warmup_iters, renorm_iters, r_max=5.0,
                 momentum=0.02, eps=1e-5):
        super().__init__()
        self.B, self.warmup_iters, self.renorm_iters = buffer_size, warmup_iters, renorm_iters
        self.r_max, self.momentum, self.eps = r_max, momentum, eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer('running_var', torch.ones(c))
        self.register_buffer('t', torch.tensor(0))
        self.register_buffer('buffer_x2', torch.zeros(buffer_size, c))
        self.register_buffer('buffer_gz', torch.zeros(buffer_size, c))

    def forward(self, x):
        return NaiveMABNFunction.apply(x, self.weight, self.bias, self)


# MABN layers start past warm-up with renorm on: the steady state, every step's path
STEADY = dict(buffer_size=16, warmup_iters=0, renorm_iters=0)


def _mabn(c):
    layer = MABN(c, **STEADY)
    layer.num_batches_tracked.fill_(1000)
    return layer


def _naive_mabn(c):
    layer = NaiveMABN(c, **STEADY)
    layer.t.fill_(1000)
    return layer


# name -> factory(num_features) -> layer; the first entry is the baseline
CANDIDATES = {
    'BatchNorm2d': nn.BatchNorm2d,
    'MABN': _mabn,
    'MABN naive': _naive_mabn,
}


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


def median_times(layers, x, dy, repeats: int, target_s: float = 0.05, agree=None) -> dict:
    """Median seconds per forward+backward for each layer, measured interleaved.

    ``agree``: maps the calls per sample chosen here to the ones to use (processes that
    synchronise must make the same calls)."""
    calls = {}
    for name, layer in layers.items():
        _step(layer, x, dy)
        start = time.perf_counter()
        _step(layer, x, dy)
        calls[name] = max(1, round(target_s / (time.perf_counter() - start)))
    if agree is not None:
        calls = agree(calls)
    samples = {name: [] for name in layers}
    names = list(layers)
    for rnd in range(repeats):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            layer, n = layers[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                _step(layer, x, dy)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def _most_calls_over_ranks(calls):
    counts = torch.tensor(list(calls.values()))
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return dict(zip(calls, counts.tolist()))


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


def _sync_worker(rank, world_size, init_file, shapes, repeats, threads, out_file):
    torch.set_num_threads(threads)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=world_size)
    rows = []
    for label, shape in shapes:
        torch.manual_seed(rank)
        x, dy = torch.randn(shape).requires_grad_(), torch.randn(shape)
        layers = {'BatchNorm2d': nn.BatchNorm2d(shape[1]),
                  'PortableSyncBN': PortableSyncBN(shape[1])}
        times = median_times(layers, x, dy, repeats, agree=_most_calls_over_ranks)
        peaks = {n: peak_bytes(layer, x, dy) for n, layer in layers.items()}
        rows.append((label, shape, times['BatchNorm2d'], times['PortableSyncBN'],
                     peaks['PortableSyncBN'] / peaks['BatchNorm2d'],
                     *collectives_per_call(layers['PortableSyncBN'], x, dy)))
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def sync_table(shapes, procs, repeats, threads):
    """PortableSyncBN on ``procs`` gloo processes against local BN, per-rank shapes."""
    threads = max(1, threads // procs)
    print(f'\nPortableSyncBN on {procs} gloo processes ({threads} threads each), per-rank '
          'shape; time ratio to nn.BatchNorm2d on that shape in the same processes')
    print(f'{"shape":<22}{"N,C,H,W":<20}{"BatchNorm2d ms":>16}{"PortableSyncBN time":>21}'
          f'{"mem":>8}{"collectives fwd+bwd":>21}')
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, 'rows.pt')
        mp.spawn(_sync_worker, nprocs=procs, args=(procs, os.path.join(tmp, 'rendezvous'),
                                                   shapes, repeats, threads, out_file))
        rows = torch.load(out_file)
    for label, shape, t_bn, t_sync, mem, fwd, bwd in rows:
        print(f'{label:<22}{",".join(map(str, shape)):<20}{t_bn * 1e3:>16.2f}'
              f'{t_sync / t_bn:>21.3f}{mem:>8.3f}{f"{fwd}+{bwd}":>21}')
    print(f'worst ratio over shapes: PortableSyncBN time '
          f'{max(r[3] / r[2] for r in rows):.3f}, memory {max(r[4] for r in rows):.3f}')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--only', nargs='+', default=None, metavar='NAME',
                        help='candidates to run besides the baseline')
    parser.add_argument('--max-numel', type=int, default=None,
                        help='skip shapes with more elements (quick runs)')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--sync-procs', type=int, default=2,
                        help='gloo processes for the PortableSyncBN table (0: skip it)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = next(iter(CANDIDATES))
    names = [n for n in CANDIDATES if n == baseline or args.only is None or n in args.only]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f'torch {torch.__version__}, {args.threads} threads, median of {args.repeats} '
          f'rounds; ratios to {baseline} (time ms | peak MB for the baseline)')
    header = f'{"shape":<22}{"N,C,H,W":<20}{baseline + " ms":>16}{"MB":>8}'
    print(header + ''.join(f'{n + " time":>18}{"mem":>8}' for n in names[1:]))
    worst = {n: [0.0, 0.0] for n in names[1:]}
    shapes = [(label, shape) for label, shape in SHAPES
              if not args.max_numel or torch.Size(shape).numel() <= args.max_numel]
    for label, shape in shapes:
        torch.manual_seed(0)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=fmt)
        layers = {n: CANDIDATES[n](shape[1]).train() for n in names}
        times = median_times(layers, x, dy, args.repeats)
        peaks = {n: peak_bytes(layer, x, dy) for n, layer in layers.items()}
        row = (f'{label:<22}{",".join(map(str, shape)):<20}'
               f'{times[baseline] * 1e3:>16.2f}{peaks[baseline] / 2**20:>8.1f}')
        for n in names[1:]:
            rt, rm = times[n] / times[baseline], peaks[n] / peaks[baseline]
            worst[n] = [max(worst[n][0], rt), max(worst[n][1], rm)]
            row += f'{rt:>18.3f}{rm:>8.3f}'
        print(row, flush=True)
    print('worst ratio over shapes: ' + '; '.join(
        f'{n}: time {t:.3f}, memory {m:.3f}' for n, (t, m) in worst.items()))
    if args.sync_procs > 1 and (args.only is None or 'PortableSyncBN' in args.only):
        sync_table(shapes, args.sync_procs, args.repeats, args.threads)


if __name__ == '__main__':
    main()

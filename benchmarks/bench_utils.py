"""What the benchmark scripts share: interleaved timing, markdown tables, bar plots."""
import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from mmdet_bnplug.testing.gloo import run_gloo

# bounds of a multi-process benchmark (s): the whole run, and any one collective
RUN_TIMEOUT_S = 3600
COLLECTIVE_TIMEOUT_S = 600


def interleaved_medians(steps: Dict[str, Callable[[], object]], repeats: int,
                        target_s: float = 0.05, warmup: int = 1,
                        agree: Optional[Callable[[dict], dict]] = None) -> Dict[str, float]:
    """Median seconds per call of each step, measured interleaved.

    Each step runs ``warmup`` times, then once timed to choose how many calls a sample
    holds (enough for about ``target_s``). Then ``repeats`` rounds run every step once
    (one sample each), in an order rotated every round, so that machine load spreads
    over all steps alike. ``agree`` maps the chosen calls per sample to the ones to use
    (processes that synchronise must make the same calls).
    """
    calls = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        start = time.perf_counter()
        step()
        calls[name] = max(1, round(target_s / max(time.perf_counter() - start, 1e-9)))
    if agree is not None:
        calls = agree(calls)
    samples = {name: [] for name in steps}
    names = list(steps)
    for rnd in range(repeats):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            step, n = steps[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                step()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def run_on_gloo(worker: Callable, procs: int, threads: int, *args):
    """``worker(rank, world_size, *args)`` on ``procs`` gloo ranks of ``threads`` torch
    threads each (``gloo_spawn.run_gloo``, bounded in time); returns rank 0's result."""
    return run_gloo(worker, procs, args=args, timeout=RUN_TIMEOUT_S,
                    pg_timeout=COLLECTIVE_TIMEOUT_S, threads=threads)[0]


def agree_on_most_calls(calls: Dict[str, int]) -> Dict[str, int]:
    """For ``interleaved_medians(agree=...)`` across ranks: every rank makes the most
    calls any rank chose, so that collectives pair up."""
    counts = torch.tensor(list(calls.values()))
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return dict(zip(calls, counts.tolist()))


DEFAULT_REPEATS = 7


def benchmark_parser(doc: str, quick: str, names: Sequence[str], sync: str):
    """The options both scripts share; ``names``: what ``--only`` may pick."""
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help=f'smoke run: {quick}')
    parser.add_argument('--repeats', type=int, default=None,
                        help=f'timing rounds (default {DEFAULT_REPEATS})')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--only', nargs='+', default=None, metavar='NAME', choices=names,
                        help='what to run besides the baseline: ' + ', '.join(names))
    parser.add_argument('--sync-procs', type=int, default=2,
                        help=f'gloo processes for {sync} (0: skip it)')
    parser.add_argument('--out-md', default=None, help='write the markdown report here')
    parser.add_argument('--out-png', default=None, help='write the plot here')
    return parser


def run_info(threads: int, sync_procs: int, sync_threads: int, load_before: float,
             details: str) -> str:
    """One line on what ran where: torch, cores, threads, ``details``, machine load."""
    sync = (f' ({sync_threads} per process on {sync_procs} gloo processes)'
            if sync_procs > 1 else '')
    return (f'torch {torch.__version__}, {os.cpu_count()} CPU cores, {threads} '
            f'thread{"s" if threads != 1 else ""}'
            f'{sync}; {details}; 1-min load average {load_before:.2f} before, '
            f'{os.getloadavg()[0]:.2f} after.')


def fmt(value, digits: int = 3) -> str:
    """A table cell: numbers rounded to ``digits`` decimals, None as a dash."""
    if value is None:
        return '-'
    return f'{value:.{digits}f}' if isinstance(value, float) else str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence], digits: int = 3) -> str:
    """A markdown table; columns after the first are right-aligned."""
    lines = ['| ' + ' | '.join(header) + ' |',
             '| --- |' + ' ---: |' * (len(header) - 1)]
    lines += ['| ' + ' | '.join(fmt(v, digits) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_text(path: Optional[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (parent directories created); nothing when path
    is None."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)


def grouped_bars(ax, groups: Sequence[str], series: Dict[str, List[Optional[float]]],
                 ylabel: str, log: bool = True, annotate: bool = False,
                 colors: Optional[Dict[str, str]] = None) -> None:
    """One bar per (group, series) on ``ax``, a dashed line at 1; None values are skipped;
    ``annotate``: the value above each bar; ``colors``: series name -> colour, so that a
    series keeps its colour across panels (default: matplotlib's cycle in series order)."""
    width = 0.84 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width
              for g, v in enumerate(values) if v is not None]
        color = colors[name] if colors else f'C{i % 10}'
        bars = ax.bar(xs, [v for v in values if v is not None], width, label=name,
                      color=color)
        if annotate:
            ax.bar_label(bars, fmt='%.2f', fontsize=8)
    ax.axhline(1.0, color='black', lw=0.8, ls='--')
    if log:
        ax.set_yscale('log')
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha='right', fontsize=8)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.grid(axis='y', which='both', alpha=0.3)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """Save a matplotlib figure as a compact PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    fig.savefig(tmp, format='png', dpi=80, bbox_inches='tight')
    os.replace(tmp, path)
    fig.clf()

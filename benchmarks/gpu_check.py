"""The GPU check run by ``benchmarks/gpu_check.sh``: the suite's CUDA-only tests, then a
short CUDA benchmark, in one markdown report.

    python -m benchmarks.gpu_check [--out-md docs/gpu_check_results.md] [--repeats 5]

1. Tests: ``pytest -m cuda tests`` (``TEST_SELECTION``), the tests marked ``cuda``: exactly
   those the suite skips without CUDA (tests/tools/test_gpu_check.py checks the two sets
   are equal). Each test's outcome comes from pytest's junit XML, skip reasons included
   (nccl across GPUs needs two).
2. Norm layers on cuda:0 over bench_norms' shapes (the BN inputs of RetinaNet R50 + FPN
   at batch 2): training forward+backward time and peak memory as ratios, in the same
   run, of MABN (its PyTorch step: what its ops dispatch to on CUDA) and PortableSyncBN
   in one process (no process group: plain BN) to nn.BatchNorm2d (cuDNN), and of EvalBN
   to nn.BatchNorm2d in eval mode. Time: median of interleaved rounds
   (``interleaved_medians``), every call followed by ``torch.cuda.synchronize()``, which
   adds the same launch-and-wait cost to each layer; memory: the peak of
   ``torch.cuda.max_memory_allocated()`` above the step's inputs.
3. The toy RetinaNet R18-FPN training iteration on cuda:0 with each norm choice
   (bench_toy's models, synthetic batches and interleaved timing), as ratios to BN.

A part that cannot run is listed with its error under "Not run" (with one GPU, the
nccl test is skipped). Exit code 1 when a test failed, else 0. About 5 minutes on one
GPU; no network.
"""
import argparse
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

import torch

from benchmarks.bench_utils import interleaved_medians, markdown_table, write_text

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TEST_SELECTION = ['-m', 'cuda', 'tests']
DEVICE = torch.device('cuda', 0)
TESTS_TIMEOUT_S = 420
# (layer, its reference): bench_norms.CANDIDATES names
PAIRS = [('MABN', 'BatchNorm2d'), ('EvalBN', 'BN eval'), ('PortableSyncBN', 'BatchNorm2d')]
TOY_BATCH = 8


def _outcome(case):
    """A junit testcase's (outcome, first line of its message)."""
    for child in case:
        if child.tag in ('failure', 'error', 'skipped'):
            return child.tag, (child.get('message', '').splitlines() or [''])[0][:150]
    return 'passed', ''


def run_tests():
    """``(rows, failed)``: per test (node id, outcome, message); whether any failed."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = osp.join(tmp, 'tests.xml')
        proc = subprocess.run([sys.executable, '-m', 'pytest', *TEST_SELECTION, '-q',
                               '-p', 'no:cacheprovider', f'--junitxml={xml}'], cwd=REPO,
                              capture_output=True, text=True, timeout=TESTS_TIMEOUT_S)
        if not osp.isfile(xml):
            raise RuntimeError(f'pytest wrote no report:\n{proc.stdout[-2000:]}'
                               f'{proc.stderr[-2000:]}')
        rows = [(f'{case.get("classname").replace(".", "/")}.py::{case.get("name")}',
                 *_outcome(case)) for case in ET.parse(xml).iter('testcase')]
    return rows, any(outcome in ('failure', 'error') for _, outcome, _ in rows)


def _train_step(layer, x, dy):
    x.grad = None
    layer(x).backward(dy)
    torch.cuda.synchronize()


def peak_bytes(layer, x, dy):
    """Peak CUDA memory of one forward+backward above what was allocated before it."""
    _train_step(layer, x, dy)  # first call outside: lazily created .grad tensors
    x.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _train_step(layer, x, dy)
    return torch.cuda.max_memory_allocated() - base


def bench_norms(repeats):
    """Per shape: BN ms, then (time ratio, memory ratio) of each pair."""
    from benchmarks.bench_norms import CANDIDATES, SHAPES
    names = sorted({n for pair in PAIRS for n in pair})
    rows = []
    for label, shape in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(shape, device=DEVICE).requires_grad_()
        dy = torch.randn(shape, device=DEVICE)
        layers = {n: CANDIDATES[n].factory(shape[1]).to(DEVICE).train() for n in names}
        times = interleaved_medians(
            {n: (lambda layer=layer: _train_step(layer, x, dy)) for n, layer in layers.items()},
            repeats, target_s=0.02)
        peaks = {n: peak_bytes(layer, x, dy) for n, layer in layers.items()}
        rows.append([label, times['BatchNorm2d'] * 1e3]
                    + [v for a, b in PAIRS for v in (times[a] / times[b], peaks[a] / peaks[b])])
    return rows


def bench_toy(repeats):
    """Per norm choice of bench_toy: (ms per training iteration, ratio to BN, loss)."""
    from mmdet.utils import register_all_modules

    from benchmarks.bench_toy import VARIANTS, build, make_batches, quiet_logs, train_times
    register_all_modules()
    quiet_logs()
    models = {}
    for name in VARIANTS:
        model, optim = build(name)
        models[name] = (model.to(DEVICE), optim)
    times, losses = train_times(models, make_batches(2, TOY_BATCH, seed=1), repeats, warmup=2)
    base = times[next(iter(VARIANTS))]
    return [[n, t * 1e3, t / base, losses[n]] for n, t in times.items()]


def _environment():
    devices = ', '.join(f'cuda:{i} {torch.cuda.get_device_name(i)}'
                        for i in range(torch.cuda.device_count()))
    return (f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN '
            f'{torch.backends.cudnn.version()} (enabled: {torch.backends.cudnn.enabled}); '
            f'{devices}')


def report(tests, norms, toy, not_run, seconds):
    out = ['# GPU check\n',
           f'Generated by `bash benchmarks/gpu_check.sh {" ".join(sys.argv[1:])}` in '
           f'{seconds / 60:.1f} min. {_environment()}.\n']
    if tests:
        counts = {o: sum(row[1] == o for row in tests) for o in ('passed', 'skipped',
                                                                 'failure', 'error')}
        out += [f'## CUDA-only tests (`pytest {" ".join(TEST_SELECTION)}`)\n',
                ', '.join(f'{n} {o}' for o, n in counts.items() if n) + '.\n',
                markdown_table(['test', 'outcome', 'message'], tests), '']
    if norms:
        header = ['shape', 'BN fwd+bwd ms'] + [f'{a} / {b} {kind}' for a, b in PAIRS
                                               for kind in ('time', 'memory')]
        summary = [[f'{stat} over shapes', None] + [
            fn(row[i] for row in norms) for i in range(2, len(header))]
            for stat, fn in (('median', statistics.median), ('worst', max))]
        out += ['## Norm layers on cuda:0 (training forward+backward, ratios)\n',
                'Ratios in the same run; PortableSyncBN in one process is plain BN.\n',
                markdown_table(header, norms + summary), '']
    if toy:
        out += [f'## Toy RetinaNet R18-FPN training iteration on cuda:0, batch {TOY_BATCH}\n',
                markdown_table(['norm', 'ms / iteration', 'ratio to BN', 'loss'], toy), '']
    skipped = {}  # (test, reason) -> cases
    for nodeid, outcome, message in tests:
        if outcome == 'skipped':
            key = (nodeid.split('[')[0], message)
            skipped[key] = skipped.get(key, 0) + 1
    out += ['## Not run\n', *not_run,
            *(f'- `{test}` ({n} case{"s" if n > 1 else ""}): {reason}'
              for (test, reason), n in skipped.items()),
            '- never here: nccl across nodes (tests/tools/test_multi_node.py runs the '
            'multi-node training on gloo, CPU)']
    return '\n'.join(out) + '\n'


def _attempt(title, part, not_run):
    """``part()``, or None with ``title`` and the error appended to ``not_run``."""
    print(f'gpu_check: {title}...', flush=True)
    try:
        return part()
    except Exception as err:  # reported; the other parts still run
        traceback.print_exc()
        not_run.append(f'- {title}: {type(err).__name__}: '
                       f'{(str(err).splitlines() or [""])[0][:300]}')
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out-md', default=osp.join(REPO, 'docs', 'gpu_check_results.md'),
                        help='the markdown report (default: docs/gpu_check_results.md)')
    parser.add_argument('--repeats', type=int, default=5, help='timing rounds')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f'gpu_check: no CUDA device (torch {torch.__version__}: '
              'torch.cuda.is_available() is False), nothing to check')
        return 0
    start = time.monotonic()
    not_run = []
    tests = _attempt('CUDA-only tests', run_tests, not_run)
    norms = _attempt('norm layer benchmark', lambda: bench_norms(args.repeats), not_run)
    toy = _attempt('toy training benchmark', lambda: bench_toy(args.repeats), not_run)
    rows, failed = tests or ([], True)
    text = report(rows, norms, toy, not_run, time.monotonic() - start)
    print(text)
    write_text(args.out_md, text)
    print(f'gpu_check: report written to {args.out_md}', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

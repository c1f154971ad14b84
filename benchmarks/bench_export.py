"""Inference cost of each norm choice once deployed: the toy RetinaNet R18-FPN exported to
ONNX with its norms folded, timed in onnxruntime and in PyTorch, as ratios to folded BN.

    python -m benchmarks.bench_export [--quick] [--out FILE] [--sizes 128 512]
        [--threads 1 2] [--batch-size 1] [--repeats 7]

Models: bench_toy's variants BN, ConvWC+MABN, EvalBN, PortableSyncBN (one process: plain
BN) and GN (``configs/toy/``, each built under the same seed with ``init_weights()``, no
checkpoint). Their BN-like layers' statistics and affine are then set to random values
(``bench_toy.randomise_norms``; MABN keeps ``running_mean`` at 0), so that folding has
something to fold; GN keeps its initial affine. Each is exported by
``mmdet_bnplug.deploy.export_detector`` (backbone, FPN and RetinaHead outputs before box
decoding and NMS; every foldable norm folded into its conv) for a batch of
``--batch-size`` images of each size in ``--sizes`` (square; the toy's own is 128).

Timed, for each thread count in ``--threads``: the folded graph in an onnxruntime CPU
session (that many intra-op threads; idle threads sleep), and PyTorch's eval forward of the
unfused and of the folded module (``torch.set_num_threads``), all on the same random input.
Median seconds per call over ``--repeats`` interleaved rounds
(``bench_utils.interleaved_medians``, order rotated each round, each sample about
``SAMPLE_S`` seconds of calls). Ratios: onnxruntime to folded BN in onnxruntime, PyTorch to
folded BN in PyTorch, same input, threads and run. Also reported: the normalisation nodes
left in each graph (``mmdet_bnplug.deploy.norm_nodes``) and onnxruntime's largest
relative error against the unfused PyTorch model on the timing input (max abs error /
max |output|, the largest over the outputs).
"""
import argparse
import os

import onnxruntime
import torch
from mmdet.utils import register_all_modules

from benchmarks.bench_toy import build, quiet_logs, randomise_norms
from benchmarks.bench_utils import (
    DEFAULT_REPEATS,
    interleaved_medians,
    markdown_table,
    run_info,
    write_text,
)
from mmdet_bnplug.deploy import compare_outputs, export_detector, norm_nodes, onnx_session

VARIANTS = ('BN', 'ConvWC+MABN', 'EvalBN', 'PortableSyncBN', 'GN')  # BN: the baseline
OUT = os.path.join('docs', 'bench_export_results.md')
SAMPLE_S = 0.3  # a sample times enough calls for this many seconds
QUICK = dict(sizes=[64], threads=[1], repeats=1, sample_s=0.0)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help=f'smoke run: {QUICK["sizes"][0]} px, 1 thread, 1 round')
    parser.add_argument('--out', default=OUT, help=f'markdown report (default {OUT})')
    parser.add_argument('--sizes', nargs='+', type=int, default=None,
                        help='square input sizes in px (default 128 512)')
    parser.add_argument('--threads', nargs='+', type=int, default=None,
                        help='thread counts to time with (default 1 2)')
    parser.add_argument('--batch-size', type=int, default=1, help='images per input')
    parser.add_argument('--repeats', type=int, default=None,
                        help=f'timing rounds (default {DEFAULT_REPEATS})')
    args = parser.parse_args()
    quick = QUICK if args.quick else dict(sizes=[128, 512], threads=[1, 2],
                                          repeats=DEFAULT_REPEATS, sample_s=SAMPLE_S)
    args.sizes = args.sizes or quick['sizes']
    args.threads = args.threads or quick['threads']
    args.repeats = args.repeats or quick['repeats']
    args.sample_s = quick['sample_s']
    return args


def export_all(models, shape):
    """``{variant: (DetectorExport, norm nodes left, max relative error)}`` at ``shape``;
    the error of onnxruntime against the unfused model on a random input."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exports = {}
    for name, model in models.items():
        export = export_detector(model, shape)
        session = onnx_session(export.onnx_model.SerializeToString())
        error = max(rel for *_, rel in
                    compare_outputs(session, export.unfused, [x], export.output_names))
        exports[name] = (export, len(norm_nodes(export.onnx_model)), error)
    return exports, x


def times(exports, x, threads, rounds, sample_s):
    """``{variant: {'onnxruntime' | 'PyTorch unfused' | 'PyTorch folded': s / call}}``."""
    torch.set_num_threads(threads)
    feed = {'inputs': x.numpy()}

    def forward(module):
        with torch.no_grad():
            return module(x)

    steps = {}
    for name, (export, _, _) in exports.items():
        session = onnx_session(export.onnx_model.SerializeToString(), threads)
        steps[name, 'onnxruntime'] = lambda s=session: s.run(None, feed)
        steps[name, 'PyTorch unfused'] = lambda m=export.unfused: forward(m)
        steps[name, 'PyTorch folded'] = lambda m=export.folded: forward(m)
    medians = interleaved_medians(steps, rounds, target_s=sample_s, warmup=1)
    result = {name: {} for name in exports}
    for (name, kind), seconds in medians.items():
        result[name][kind] = seconds
    return result


def section(title, exports, timed) -> str:
    """One input size and thread count: a table of times and ratios to folded BN."""
    base = timed[VARIANTS[0]]
    rows = []
    for name, (_, nodes, error) in exports.items():
        t = timed[name]
        rows.append([name, nodes, t['onnxruntime'] * 1e3,
                     t['onnxruntime'] / base['onnxruntime'],
                     t['PyTorch unfused'] * 1e3, t['PyTorch unfused'] / base['PyTorch folded'],
                     t['PyTorch folded'] * 1e3, t['PyTorch folded'] / base['PyTorch folded'],
                     f'{error:.1e}'])
    header = ['variant', 'norm nodes', 'onnxruntime ms', 'ratio', 'PyTorch unfused ms',
              'ratio', 'PyTorch folded ms', 'ratio', 'max rel error']
    return f'## {title}\n\n' + markdown_table(header, rows)


def summary(results) -> str:
    """Onnxruntime ratio to folded BN of each variant, one column per size and threads."""
    header = ['variant'] + [title for title, _, _ in results]
    rows = [[name] + [timed[name]['onnxruntime'] / timed[VARIANTS[0]]['onnxruntime']
                      for _, _, timed in results] for name in VARIANTS]
    return ('## Summary: onnxruntime, folded graph, ratio to folded BN\n\n'
            + markdown_table(header, rows))


def main():
    args = parse_args()
    register_all_modules()
    quiet_logs()
    load_before = os.getloadavg()[0]
    models = {name: randomise_norms(build(name)[0].eval()) for name in VARIANTS}
    results = []
    for size in args.sizes:
        shape = (args.batch_size, 3, size, size)
        exports, x = export_all(models, shape)
        for threads in args.threads:
            title = (f'{"x".join(map(str, shape))}, {threads} '
                     f'thread{"s" if threads > 1 else ""}')
            results.append((title, exports, times(exports, x, threads, args.repeats,
                                                  args.sample_s)))
            print(f'{title}: done', flush=True)
    threads = args.threads[0] if len(args.threads) == 1 else \
        ' and '.join(map(str, args.threads))
    info = run_info(threads, 1, 1, load_before,
                    f'onnxruntime {onnxruntime.__version__}; median of {args.repeats} '
                    'interleaved rounds after one warm-up call')
    text = '\n\n'.join([
        '# Toy RetinaNet R18-FPN exported to ONNX: inference cost of the norm choices',
        info,
        'Each variant\'s graph has every foldable norm folded into its conv '
        '(`tools/export_onnx.py`\'s export); "norm nodes": normalisation nodes left in it. '
        'Ratios are to folded BN in the same run, same input and threads: onnxruntime to '
        'onnxruntime, both PyTorch columns to PyTorch folded. Max rel error: onnxruntime '
        'against the unfused PyTorch model (max abs error / max |output|, worst output).',
        summary(results)] + [section(title, exports, timed)
                             for title, exports, timed in results]) + '\n'
    print(text)
    write_text(args.out, text)


if __name__ == '__main__':
    main()

"""Evaluate a checkpoint: ``python tools/test.py CONFIG CHECKPOINT [--work-dir DIR]
[--out results.pkl] [--cfg-options k=v ...] [--launcher ...]`` (mmdet 3.x style).

``--out`` is mmdet's prediction dump (``DumpDetResults``), written atomically once the
test is done; it may not be the checkpoint or the config (or a link to them)."""
import argparse
import os.path as osp
import time

import cli

from mmdet.evaluation import DumpDetResults
from mmengine.fileio import dump

import mmdet_bnplug  # noqa: F401  (registers the plugin; configs need no custom_imports)
from checkpoint_io import check_output_path, write_atomic
from rank_watch import watch_ranks
from run_config import (
    add_common_args,
    build_runner,
    check_datasets,
    close_distributed,
    load_config,
)
from run_summary import summary_line


class KeepDetResults(DumpDetResults):
    """mmdet's ``DumpDetResults`` that keeps the collected predictions (``predictions``,
    on rank 0) instead of dumping them itself."""

    def compute_metrics(self, results: list) -> dict:
        self.predictions = results
        return {}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a detector checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='dump the raw predictions to this .pkl file')
    return add_common_args(parser).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise cli.MissingInput(f'checkpoint file not found: {args.checkpoint!r}')
    if args.out is not None:
        if not args.out.endswith(('.pkl', '.pickle')):
            raise cli.BadValue(f'--out must be a .pkl or .pickle file, got {args.out!r}')
        check_output_path(args.out, [args.checkpoint, args.config])
    cfg = load_config(args)
    check_datasets(cfg, ['test_dataloader'])
    cfg.load_from = args.checkpoint
    runner = build_runner(cfg)
    if args.out is not None:
        keep = KeepDetResults(out_file_path=args.out)
        runner.test_evaluator.metrics.append(keep)
    start = time.monotonic()
    with watch_ranks():
        metrics = runner.test()
    if runner.rank == 0:
        if args.out is not None:
            write_atomic(args.out, lambda f: dump(keep.predictions, f, file_format='pkl'),
                         inputs=[args.checkpoint, args.config])
            print(f'predictions saved to {args.out}', flush=True)
        print(summary_line(f'evaluated {args.checkpoint}', metrics or {},
                           time.monotonic() - start,
                           score_thr=cfg.get('model', {}).get('test_cfg', {}).get('score_thr')),
              flush=True)
    close_distributed()


if __name__ == '__main__':
    cli.run(main)

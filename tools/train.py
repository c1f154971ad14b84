"""Train a detector: ``python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
[--amp] [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]`` (mmdet 3.x style)."""
import argparse
import time

import cli

import mmdet_bnplug  # noqa: F401  (registers the plugin: configs need no custom_imports)
from rank_watch import watch_ranks
from run_config import (
    add_common_args,
    build_runner,
    check_checkpoint_path,
    check_datasets,
    close_distributed,
    load_config,
    use_amp,
)
from run_summary import RunSummaryHook, summary_line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision: fp16 with loss scaling on CUDA, '
                        'bf16 autocast on the CPU')
    parser.add_argument(
        '--resume', nargs='?', const='auto', default=None,
        help='resume from CKPT, or with no value from the latest checkpoint in the work dir')
    return add_common_args(parser).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    check_datasets(cfg, ['train_dataloader', 'val_dataloader'])
    if args.amp:
        use_amp(cfg)
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        check_checkpoint_path(args.resume, '--resume')
        cfg.resume, cfg.load_from = True, args.resume
    else:
        check_checkpoint_path(cfg.get('load_from'), 'load_from')
    runner = build_runner(cfg)
    summary = RunSummaryHook()
    runner.register_hook(summary)
    with watch_ranks():
        runner.train()
        close_distributed()
    if runner.rank == 0:
        print(summary_line(f'trained {args.config}', summary.metrics,
                           time.monotonic() - summary.start, runner.iter,
                           cfg.get('model', {}).get('test_cfg', {}).get('score_thr')),
              flush=True)


if __name__ == '__main__':
    cli.run(main)

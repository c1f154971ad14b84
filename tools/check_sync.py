"""Does N processes x b images train like 1 process x N*b images? One training step both ways.

    python tools/check_sync.py CONFIG [--procs 4] [--batch 8] [--double] [--steps K]
        [--rtol R] [--seed 0] [--cfg-options k=v ...]

From the same initial weights and the same global batch (the config's train dataloader,
seeded alike in every process; ``--batch`` images, default the config's batch size), runs
one training step as ``--procs`` gloo processes with ``batch / procs`` images each (the
config's norms; gradients averaged as DDP does) and as one process with all of them
(where PortableSyncBN is plain BN), then prints the relative differences of each norm
layer's output and running statistics, of the losses and of the gradients by part, the
first place where the two part and the likely cause (norm statistics, loss
normalisation, padding to different batch shapes, random sampling, dropout). With
``--steps K`` both then train K iterations with the config's optimizer and the final
weights and buffers are compared too. Exit code 0
when every difference is within ``--rtol``, 1 beyond it, 2 for bad input.
"""
import argparse

import cli

from mmengine.config import DictAction

import mmdet_bnplug  # noqa: F401  (registers the plugin)
from mmdet_bnplug.analysis.sync_check import (
    build_model,
    compare,
    diagnose,
    format_comparison,
    quiet_logs,
    run_sync_check,
    uses_fix,
)
from run_config import check_datasets, check_norm_types, read_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='detector config (its train dataloader is used)')
    parser.add_argument('--procs', type=int, default=4,
                        help='gloo processes of the synchronised run (default 4)')
    parser.add_argument('--batch', type=int,
                        help="global batch (default: the config's train batch size)")
    parser.add_argument('--double', action='store_true',
                        help='run both in float64 (default float32)')
    parser.add_argument('--rtol', type=float,
                        help='largest accepted relative difference (default 1e-6 with '
                        '--double, else 1e-4)')
    parser.add_argument('--steps', type=int, default=0,
                        help="then this many training iterations both ways with the config's "
                        'optimizer (clipping included, lr at its base value), each on the '
                        'next global batch, and compare the weights and buffers (default 0)')
    parser.add_argument('--seed', type=int, default=0, help='weights and data seed')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value pairs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = read_config(args.config, args.cfg_options)
    check_norm_types(cfg.get('model', {}))
    if not cfg.get('train_dataloader'):
        raise cli.BadValue(f'{args.config}: no train_dataloader: the check takes its '
                           'batch from the config\'s train dataloader')
    check_datasets(cfg, ['train_dataloader'])
    batch = args.batch if args.batch is not None else cfg.train_dataloader.get('batch_size')
    if args.steps < 0:
        raise cli.BadValue(f'--steps must be >= 0, got {args.steps}')
    if args.procs < 2:
        raise cli.BadValue(f'--procs must be >= 2, got {args.procs}')
    if not isinstance(batch, int) or batch < 1 or batch % args.procs:
        raise cli.BadValue(f'--procs {args.procs} does not divide the global batch '
                           f'{batch!r} (--batch, or the config\'s train batch size); '
                           'choose a divisor or another --batch')
    quiet_logs()
    rtol = args.rtol if args.rtol is not None else (1e-6 if args.double else 1e-4)
    try:
        reference, ranks = run_sync_check(cfg, args.procs, batch, args.seed, args.double,
                                          steps=args.steps)
    except RuntimeError as err:
        if args.double and 'Double' in str(err):
            raise cli.UnsupportedHere(
                f'--double: an op of this model takes float32 only ({err}); mmcv\'s CPU '
                'nms and RoIAlign do (two-stage detectors): run without --double') from err
        raise
    comparison = compare(reference, ranks)
    print(f'check_sync: {args.config}: {args.procs} processes x {batch // args.procs} '
          f'images against 1 process x {batch}, '
          f'{"float64" if args.double else "float32"}, loss normalisers '
          f'{"global (GlobalLossNormHook)" if uses_fix(cfg) else "as the heads compute them"}')
    print(format_comparison(comparison, rtol))
    first, cause = diagnose(comparison, cfg, build_model(cfg), rtol)
    if first is None:
        after = f', and after {args.steps} optimizer steps every weight and buffer' \
            if args.steps else ''
        print(f'\nequal within {rtol:g}: every norm output and statistic, loss and '
              f'gradient{after}')
        return 0
    print(f'\nfirst difference beyond {rtol:g}: {first}\nlikely cause: {cause}')
    return 1


if __name__ == '__main__':
    cli.run(main)

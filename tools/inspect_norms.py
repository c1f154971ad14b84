"""Is my BN really frozen? A table of every norm layer of a config or checkpoint.

    python tools/inspect_norms.py CONFIG [--checkpoint CKPT] [--iters N] [--cfg-options k=v ...]

CONFIG is required, also with a checkpoint: the config mmengine stores in a checkpoint is
Python and is never run (the run's work dir holds the config file it dumped).

For each BN-like layer, after ``model.train()`` (as the training loop calls it): type,
training flag, affine requires_grad, whether it is meant to be frozen and why, statistics.
With ``--iters N``, runs N training iterations on the config's train dataloader and
optimizer and reports which layers' statistics moved.
"""
import argparse

import cli

from mmengine.config import DictAction
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS, init_default_scope
from mmengine.runner import Runner

import mmdet_bnplug  # noqa: F401  (registers the plugin)
from checkpoint_io import load_model
from mmdet_bnplug.analysis.norm_report import COLUMNS, inspect_norms
from run_config import check_datasets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Report the state of every norm layer',
        usage='%(prog)s CONFIG [--checkpoint CKPT] [--iters N] [--cfg-options k=v ...]')
    # required, checked by load_model: its error says why a stored config is not used
    parser.add_argument('config', nargs='?', help='config file (required, also with '
                        '--checkpoint)')
    parser.add_argument('--checkpoint', help='checkpoint whose weights to load')
    parser.add_argument('--iters', type=int, default=0,
                        help='training iterations to run before reporting which '
                        'statistics moved (default 0: none)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value pairs')
    args = parser.parse_args(argv)
    if args.iters < 0:
        parser.error(f'--iters must be >= 0, got {args.iters}')
    return args


def make_train_step(model, cfg):
    """One training iteration of ``cfg``'s dataloader and optimizer, as a callable."""
    check_datasets(cfg, ['train_dataloader'])
    loader_cfg = dict(cfg.train_dataloader, num_workers=0, persistent_workers=False)
    batches = iter(Runner.build_dataloader(loader_cfg, seed=0))
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    return lambda: model.train_step(next(batches), optim_wrapper)


def main(argv=None):
    args = parse_args(argv)
    model, cfg, _ = load_model(args.config, args.checkpoint, args.cfg_options)
    for hook_cfg in cfg.get('custom_hooks', []):  # freezing by name, as training applies it
        if hook_cfg.get('type') == 'FreezeNormsHook':
            HOOKS.build(hook_cfg).apply(model)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    train_step = make_train_step(model, cfg) if args.iters else None
    print(inspect_norms(model, train_step, args.iters))
    print('\n' + COLUMNS)


if __name__ == '__main__':
    cli.run(main)

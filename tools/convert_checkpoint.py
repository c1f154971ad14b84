"""Convert the norm layers of a checkpoint to another type (BN, EvalBN, MABN, ...).

    python tools/convert_checkpoint.py CKPT OUT --to EvalBN --config CONFIG
        [--to-options k=v ...] [--include GLOB ...] [--exclude GLOB ...] [--cfg-options ...]

Builds the model of CONFIG (required: the config mmengine stores in CKPT is Python and is
never run; the run's work dir holds the config file it dumped), loads CKPT strictly,
converts the selected BN-like layers with ``mmdet_bnplug.transforms.convert_norm`` and saves
the weights to OUT (``state_dict`` + ``meta``; no optimizer state), atomically; OUT may
not be the input (or a link to it). Use OUT as
``load_from`` with a config whose ``norm_cfg`` has the new type.
"""
import argparse
import os.path as osp

import cli

from mmengine.config import DictAction
from mmengine.runner.checkpoint import weights_to_cpu

import mmdet_bnplug  # noqa: F401  (registers the plugin)
from checkpoint_io import check_output_path, load_model, save_atomic
from mmdet_bnplug.analysis.norm_report import format_norm_table, norm_table
from mmdet_bnplug.transforms import convert_norm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert the norm layers of a checkpoint',
        usage='%(prog)s CKPT OUT --to TYPE --config CONFIG [options]')
    parser.add_argument('checkpoint', help='input checkpoint')
    parser.add_argument('out', help='output checkpoint (.pth)')
    parser.add_argument('--to', required=True,
                        help='target norm type, a registered name: EvalBN, BN, MABN, '
                        'PortableSyncBN, mmdet.FrozenBN, ...')
    parser.add_argument('--to-options', nargs='+', action=DictAction, default={},
                        help='constructor kwargs of the target, e.g. requires_grad=False')
    # required, checked by load_model: its error says why the stored config is not used
    parser.add_argument('--config', help='config file of the checkpoint (required), e.g. '
                        'the one its work dir holds')
    parser.add_argument('--include', nargs='+', help='glob(s) of layer names to convert')
    parser.add_argument('--exclude', nargs='+', help='glob(s) of layer names to keep')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value pairs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_output_path(args.out, [args.checkpoint, args.config])  # before anything is read or built
    model, _, ckpt = load_model(args.config, args.checkpoint, args.cfg_options,
                                strict=True)
    to = dict(args.to_options, type=args.to)
    try:
        model = convert_norm(model, to, include=args.include, exclude=args.exclude)
    except ValueError as err:  # an unknown --to, a pattern matching nothing, ...
        raise cli.BadValue(str(err)) from err
    meta = {k: v for k, v in ckpt.get('meta', {}).items() if k != 'cfg'}
    meta['norm_conversion'] = dict(source=osp.basename(args.checkpoint), to=to,
                                   include=args.include, exclude=args.exclude)
    save_atomic(dict(meta=meta, state_dict=weights_to_cpu(model.state_dict())), args.out,
                inputs=[args.checkpoint, args.config])
    print(format_norm_table(norm_table(model)))
    print(f'saved {args.out}')


if __name__ == '__main__':
    cli.run(main)

"""Load a BN checkpoint into a ConvWC + MABN model, report how far outputs move, save it.

    python tools/mabn_from_bn.py CONFIG BN_CHECKPOINT OUT [--submodule backbone]
        [--shape 1 3 800 1344]

Loads ``BN_CHECKPOINT`` (a path or e.g. ``torchvision://resnet50``) into the model of
``CONFIG`` (or its ``--submodule``), prints the per-layer output change against the BN
model the checkpoint describes (``mmdet_bnplug.transforms.mabn_from_bn``) and saves the
converted checkpoint to ``OUT``, atomically; OUT may not be an input.
"""
import argparse

import cli

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner.checkpoint import load_checkpoint

import mmdet_bnplug  # noqa: F401  (registers the layers)
from checkpoint_io import check_output_path, save_atomic
from mmdet_bnplug.transforms.mabn_from_bn import format_report, output_change
from run_config import check_norm_types


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Load a BN checkpoint into a ConvWC + MABN model, report how far '
        'outputs move, save the converted checkpoint.')
    parser.add_argument('config', help='config of the ConvWC + MABN model')
    parser.add_argument('checkpoint', help='BN checkpoint: path or URL/torchvision://...')
    parser.add_argument('out', help='where to save the converted checkpoint')
    parser.add_argument('--submodule', default=None,
                        help='load into this submodule, e.g. "backbone" for an ImageNet '
                        'backbone checkpoint (the report then covers that submodule)')
    parser.add_argument('--shape', type=int, nargs='+', default=[1, 3, 800, 1344],
                        help='sample input shape (random normal, as a normalised image)')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    check_output_path(args.out, [args.checkpoint, args.config])  # before anything is read or built
    cfg = Config.fromfile(args.config)
    check_norm_types(cfg.model)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        model = MODELS.build(cfg.model)
    target = model.get_submodule(args.submodule) if args.submodule else model
    load_checkpoint(target, args.checkpoint, map_location='cpu', strict=False,
                    revise_keys=[(r'^module\.', '')])
    inputs = torch.randn(args.shape, generator=torch.Generator().manual_seed(0))
    print(format_report(output_change(target, inputs)))
    save_atomic({'state_dict': model.state_dict(),
                 'meta': dict(converted_from=args.checkpoint)}, args.out,
                inputs=[args.checkpoint, args.config])
    print(f'saved {args.out}')


if __name__ == '__main__':
    cli.run(main)

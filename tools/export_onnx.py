"""Export a detector to ONNX with every foldable norm folded into its conv.

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--to EvalBN] [--shape N C H W]
        [--check] [--check-batches 2] [--rtol 1e-4] [--cfg-options k=v ...]

Builds CONFIG's model and loads CHECKPOINT into it strictly (``checkpoint_io.load_model``:
safe loading; the config stored in the checkpoint is not used), optionally converts every
BN-like layer to ``--to`` (``convert_norm``), folds every foldable norm into the conv
before it and exports the detector's tensor part (``mmdet_bnplug.deploy.export_detector``:
backbone, neck and dense head, or RPN, outputs before post-processing; each fold verified
on a probe input of the export shape) to OUT, atomically; OUT may not be an input. The
graph's input ``inputs`` is (N, C, H, W) float32, what the model's data_preprocessor makes
(normalised, padded); default N=1, C=3 and H x W from the test pipeline's ``Resize`` scale
(landscape, the long side as W, with ``keep_ratio``), rounded up to the data_preprocessor's
``pad_size_divisor``.

``--check`` runs OUT in onnxruntime on the first batches of the config's test dataloader
(through the data_preprocessor, padded to H x W) and compares every output with the
unfused PyTorch model in eval mode. Relative error of an output: its largest absolute
error divided by the largest absolute value of the PyTorch output, over all checked
images; exit code 1 when one exceeds ``--rtol``.

Prints the normalisation nodes left in the graph, each with the module it comes from and
why that module was not folded.
"""
import argparse
import copy
import sys

import cli

import torch
import torch.nn.functional as F
from mmengine.config import DictAction
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

import mmdet_bnplug  # noqa: F401  (registers the plugin)
from checkpoint_io import check_output_path, load_model, write_atomic
from mmdet_bnplug.deploy import (
    DetectorTensors,
    compare_outputs,
    export_detector,
    norm_nodes,
    onnx_session,
)
from mmdet_bnplug.transforms import convert_norm
from mmdet_bnplug.transforms.convert import norm_targets
from mmdet_bnplug.utils.bn_like import bn_like_layers
from run_config import check_datasets

PREFIX = 'detector.'  # DetectorTensors' attribute: module names below it start with this


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a detector to ONNX with its norms folded into the convs',
        usage='%(prog)s CONFIG CHECKPOINT OUT.onnx [options]')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint to load (strictly)')
    parser.add_argument('out', help='output ONNX file')
    parser.add_argument('--to', help='convert every BN-like layer to this registered type '
                        'first: EvalBN, BN, MABN, PortableSyncBN, mmdet.FrozenBN, ...')
    parser.add_argument('--shape', nargs=4, type=int, metavar=('N', 'C', 'H', 'W'),
                        help='input shape (default: 1, 3 and H x W from the test pipeline)')
    parser.add_argument('--check', action='store_true',
                        help='compare onnxruntime with the unfused PyTorch model on test '
                        'images; exit code 1 beyond --rtol')
    parser.add_argument('--check-batches', type=int, default=2,
                        help='test batches (of N images) to check on (default 2)')
    parser.add_argument('--rtol', type=float, default=1e-4,
                        help='largest accepted max abs error / max |output| (default 1e-4)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, key=value pairs')
    return parser.parse_args(argv)


def check_norm_target(to):
    """UnknownName unless ``to`` is a registered BN-like type (a --to choice)."""
    choices = norm_targets()
    if to not in choices:
        raise cli.UnknownName(f'--to {to!r} is not a registered BN-like norm type; '
                              f'choices: {", ".join(choices)}')


def default_shape(cfg) -> tuple:
    """(1, 3, H, W) from the test pipeline's ``Resize(scale=(w, h))``: with
    ``keep_ratio`` (h, w) = (short side, long side); rounded up to the data_preprocessor's
    ``pad_size_divisor``."""
    pipeline = cfg.test_dataloader.dataset.get('pipeline') or cfg.get('test_pipeline', [])
    resize = next((t for t in pipeline if t.get('type') == 'Resize' and 'scale' in t), None)
    if resize is None:
        raise cli.BadValue('the test pipeline has no Resize(scale=...) to take the input '
                           'size from: pass --shape N C H W')
    w, h = resize['scale']
    if resize.get('keep_ratio', False):
        h, w = min(w, h), max(w, h)
    divisor = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 1)
    return (1, 3, -(-h // divisor) * divisor, -(-w // divisor) * divisor)


def check_shape(model, shape):
    """BadValue unless the detector takes inputs of ``shape``: positive sizes, H and W
    multiples of its data_preprocessor's ``pad_size_divisor`` (as every batch it makes),
    and a forward of its tensor part that runs."""
    try:
        tensors = DetectorTensors(model).eval()
    except TypeError as err:  # a detector type without a tensor part to export
        raise cli.BadValue(str(err)) from err
    divisor = getattr(model.data_preprocessor, 'pad_size_divisor', 1)
    if min(shape) < 1:
        raise cli.BadValue(f'--shape {shape}: every size must be positive')
    if shape[2] % divisor or shape[3] % divisor:
        raise cli.BadValue(f'--shape {shape}: H and W must be multiples of the '
                           f"data_preprocessor's pad_size_divisor, {divisor}")
    try:
        with torch.no_grad():
            tensors(torch.zeros(shape))
    except RuntimeError as err:
        raise cli.BadValue(f'the model cannot take inputs of shape {shape}: '
                           f'{str(err).splitlines()[0]}') from err


def norm_report(export) -> list:
    """``[(kind, module name, why it is not folded)]`` for each normalisation node left
    in the graph of ``export`` (a ``DetectorExport``)."""
    modules = dict(export.folded.named_modules())
    rows = []
    for _, kind, module in norm_nodes(export.onnx_model, modules):
        if module in export.unfused_norms:
            why = export.unfused_norms[module]
        elif module is None:
            why = 'not traced to a module'
        else:
            why = (f'computed inside {type(modules[module]).__name__}, not by a norm '
                   'layer that fuse_norm knows')
        rows.append((kind, (module or '?').removeprefix(PREFIX), why))
    return rows


def check_inputs(cfg, model, shape, batches) -> list:
    """Up to ``batches`` inputs of ``shape``: full batches of N test images through the
    model's data_preprocessor, padded at the bottom and right to H x W with its
    ``pad_value``."""
    n, _, height, width = shape
    loader_cfg = copy.deepcopy(cfg.test_dataloader)
    loader_cfg.update(batch_size=n, num_workers=0, persistent_workers=False)
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope', 'mmdet')):
        loader = Runner.build_dataloader(loader_cfg)
    preprocessor, inputs = model.data_preprocessor, []
    for batch in loader:
        x = preprocessor(batch, False)['inputs']
        if len(x) < n:
            break
        h, w = x.shape[-2:]
        if h > height or w > width:
            raise cli.BadValue(f'a test batch is {h}x{w}, larger than the export shape '
                               f'{height}x{width}: pass a larger --shape')
        inputs.append(F.pad(x, (0, width - w, 0, height - h),
                            value=getattr(preprocessor, 'pad_value', 0)))
        if len(inputs) == batches:
            break
    if not inputs:
        raise cli.BadValue(f'the test dataloader has no full batch of {n} images to check')
    return inputs


def main(argv=None):
    args = parse_args(argv)
    check_output_path(args.out, [args.config, args.checkpoint])  # before anything is built
    if args.to is not None:
        check_norm_target(args.to)
    if args.check_batches < 1:
        raise cli.BadValue(f'--check-batches {args.check_batches}: at least 1')
    model, cfg, _ = load_model(args.config, args.checkpoint, args.cfg_options, strict=True)
    if args.check:
        check_datasets(cfg, ['test_dataloader'])
    shape = tuple(args.shape) if args.shape else default_shape(cfg)
    if args.to is not None:
        try:
            model = convert_norm(model, args.to)
        except ValueError as err:  # e.g. a model without BN-like layers
            raise cli.BadValue(str(err)) from err
    check_shape(model, shape)
    export = export_detector(model, shape)
    write_atomic(args.out, lambda f: f.write(export.onnx_model.SerializeToString()),
                 inputs=[args.config, args.checkpoint])
    folded = len(bn_like_layers(export.unfused)) - len(bn_like_layers(export.folded))
    print(f'folded {folded} norm layers into their convs; saved {args.out}: input '
          f'inputs {shape}, outputs {", ".join(export.output_names)}')
    rows = norm_report(export)
    print(f'normalisation nodes left in the graph: {len(rows)}')
    for kind, module, why in rows:
        print(f'  {kind} ({module}): {why}')
    if args.check:
        inputs = check_inputs(cfg, model, shape, args.check_batches)
        results = compare_outputs(onnx_session(args.out, torch.get_num_threads()),
                                  export.unfused, inputs, export.output_names)
        print(f'onnxruntime vs unfused PyTorch on {len(inputs) * shape[0]} test images '
              '(relative error: max abs error / max |PyTorch output|):')
        for name, err, scale, rel in results:
            print(f'  {name}: max abs error {err:.2e}, max |output| {scale:.3g}, '
                  f'relative {rel:.2e}')
        failed = [name for name, _, _, rel in results if not rel <= args.rtol]
        if failed:
            print(f'check failed: relative error above --rtol {args.rtol:g} in '
                  f'{", ".join(failed)}', file=sys.stderr)
            sys.exit(1)
        print(f'check passed: every relative error <= {args.rtol:g}')


if __name__ == '__main__':
    cli.run(main)

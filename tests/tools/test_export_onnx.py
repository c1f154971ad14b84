"""tools/export_onnx.py: the toy detectors export with every norm folded (none left in the
graph) and onnxruntime computes what the unfused PyTorch model does; GroupNorm stays in
the graph, reported as not foldable; bad input is one error line."""
import functools
import os
import os.path as osp

import cli

import onnx
import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from torch import nn

from checkpoint_io import load_model
from conftest import REPO, TOY_BN_CONFIG, data_root_options, run_tool
from export_onnx import check_inputs, main, norm_report
from mmdet_bnplug.deploy import (
    DetectorTensors,
    compare_outputs,
    export_detector,
    norm_nodes,
    onnx_session,
)
from mmdet_bnplug.deploy.onnx_export import to_onnx
from mmdet_bnplug.deploy.onnx_norms import DECOMPOSED
from mmdet_bnplug.utils.bn_like import bn_like_layers
from norm_helpers import randomise_norms

SHAPE = (1, 3, 128, 128)
RTOL = 1e-4
GN = dict(type='GN', num_groups=32, requires_grad=True)
GN_WHY = 'GroupNorm normalises with per-sample statistics at run time: not foldable'
RETINANET = [f'{group}_{level}' for group in ('cls_score', 'bbox_pred') for level in range(4)]
TWO_STAGE = [f'{group}_{level}' for group in ('feat', 'rpn_cls_score', 'rpn_bbox_pred')
             for level in range(5)]


def toy(name):
    return osp.join(REPO, 'configs', 'toy', f'{name}.py')


@functools.lru_cache(maxsize=None)
def exported(config, data_root, gn=False):
    """``(model, cfg, DetectorExport)`` of a toy config (``gn``: with GN in the
    backbone) with torch's default random weights (seeded) and random norm statistics
    and affine."""
    options = dict(o.split('=', 1) for o in data_root_options(data_root))
    if gn:
        options['model.backbone.norm_cfg'] = GN
    torch.manual_seed(0)
    model, cfg, _ = load_model(toy(config), None, options)
    randomise_norms(model)
    return model, cfg, export_detector(model, SHAPE)


def relative_errors(config, data_root, gn=False):
    """``{output name: relative error}`` of onnxruntime against the unfused model on
    two test images; asserts that every output is non-zero."""
    model, cfg, export = exported(config, data_root, gn)
    inputs = check_inputs(cfg, model, SHAPE, batches=2)
    results = compare_outputs(onnx_session(export.onnx_model.SerializeToString()), export.unfused,
                      inputs, export.output_names)
    assert all(scale > 0 for _, _, scale, _ in results)
    return {name: rel for name, _, _, rel in results}


@pytest.mark.parametrize('config, names', [
    ('retinanet_r18_fpn_bn_toy', RETINANET), ('retinanet_r18_fpn_mabn_toy', RETINANET),
    ('retinanet_r18_fpn_evalbn_toy', RETINANET), ('retinanet_r18_fpn_syncbn_toy', RETINANET),
    ('mask_rcnn_r18_fpn_bn_toy', TWO_STAGE), ('mask_rcnn_r18_fpn_mabn_toy', TWO_STAGE),
    # ConvWC + MABN in a per-level head: one folded conv per level
    ('retinanet_r18_fpn_mabn_2img_all_toy', RETINANET)])
def test_toy_exports_folded_and_onnxruntime_matches(config, names, tiny_synthetic,
                                                    one_thread):
    _, _, export = exported(config, tiny_synthetic)
    assert export.output_names == names
    assert [o.name for o in export.onnx_model.graph.output] == names
    assert norm_nodes(export.onnx_model) == []
    assert bn_like_layers(export.unfused.detector.backbone)
    for part in ('backbone', 'neck', 'rpn_head' if 'rcnn' in config else 'bbox_head'):
        assert not bn_like_layers(getattr(export.folded.detector, part)), part
    errors = relative_errors(config, tiny_synthetic)
    assert max(errors.values()) <= RTOL, errors


def test_group_norm_stays_in_the_graph_reported_as_not_foldable(tiny_synthetic, one_thread):
    config = 'retinanet_r18_fpn_bn_toy'
    model, _, export = exported(config, tiny_synthetic, gn=True)
    rows = norm_report(export)
    group_norms = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert len(group_norms) == 20
    assert sorted(module for _, module, _ in rows) == sorted(group_norms)
    assert {why for _, _, why in rows} == {GN_WHY}
    assert {kind for kind, _, _ in rows} <= {'GroupNormalization', 'InstanceNormalization'}
    errors = relative_errors(config, tiny_synthetic, gn=True)
    assert max(errors.values()) <= RTOL, errors


def test_a_decomposed_normalisation_is_found_and_named(one_thread):
    class Centre(nn.Module):
        def forward(self, x):
            centred = x - x.mean(dim=(2, 3), keepdim=True)
            return centred / centred.pow(2).mean(dim=(2, 3), keepdim=True).add(1e-5).sqrt()

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Centre())
    proto = to_onnx(model, torch.randn(1, 3, 8, 8), ['out'])
    assert [(kind, module) for _, kind, module in norm_nodes(proto, ['0', '1'])] == \
        [(DECOMPOSED, '1')]


def test_the_documented_call_turns_the_outputs_into_boxes(tiny_synthetic, one_thread):
    """``bbox_head.predict_by_feat`` on the exported outputs gives ``model.predict``'s
    detections: exactly on PyTorch's outputs, the same top score on onnxruntime's."""
    model, cfg, export = exported('retinanet_r18_fpn_bn_toy', tiny_synthetic)
    names = export.output_names
    with DefaultScope.overwrite_default_scope('mmdet'):
        batch = next(iter(Runner.build_dataloader(
            dict(cfg.test_dataloader, batch_size=1, num_workers=0,
                 persistent_workers=False))))
    data = model.data_preprocessor(batch, False)
    inputs, samples = data['inputs'], data['data_samples']
    assert tuple(inputs.shape) == SHAPE
    metas = [sample.metainfo for sample in samples]
    with torch.no_grad():
        expected = model.predict(inputs, samples, rescale=True)[0].pred_instances
        ours = model.bbox_head.predict_by_feat(
            **DetectorTensors.regroup(export.unfused(inputs), names), batch_img_metas=metas,
            rescale=True)[0]
        ort = onnx_session(export.onnx_model.SerializeToString()).run(
            names, {'inputs': inputs.numpy()})
        from_ort = model.bbox_head.predict_by_feat(
            **DetectorTensors.regroup([torch.from_numpy(o) for o in ort], names),
            batch_img_metas=metas, rescale=True)[0]
    assert len(expected) > 0
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(ours[key], expected[key]), key
    assert abs(from_ort.scores.max() - expected.scores.max()) < 1e-5


def test_cli_on_a_trained_checkpoint(trained_toy, tmp_path, capsys, one_thread):
    root, _, checkpoint = trained_toy
    out = tmp_path / 'new_dir' / 'toy.onnx'
    main([TOY_BN_CONFIG, checkpoint, str(out), '--to', 'EvalBN', '--check',
          '--cfg-options', *data_root_options(root)])
    text = capsys.readouterr().out
    assert f'saved {out}: input inputs (1, 3, 128, 128), outputs ' + ', '.join(RETINANET) \
        in text
    assert 'normalisation nodes left in the graph: 0' in text
    assert 'on 2 test images' in text and 'check passed' in text
    assert os.listdir(out.parent) == ['toy.onnx']  # no temporary left
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ['inputs']
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == \
        list(SHAPE)
    # beyond the tolerance: the table, one line on stderr, exit code 1
    with pytest.raises(SystemExit) as exit_:
        main([TOY_BN_CONFIG, checkpoint, str(tmp_path / 'strict.onnx'), '--check',
              '--rtol', '1e-12', '--cfg-options', *data_root_options(root)])
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and 'cls_score_0: max abs error ' in captured.out
    assert captured.err.startswith('check failed: relative error above --rtol 1e-12 in ')


def test_missing_checkpoint_from_the_command_line(tmp_path):
    out = tmp_path / 'out.onnx'
    result = run_tool(['tools/export_onnx.py', TOY_BN_CONFIG, str(tmp_path / 'no.pth'),
                       str(out)], timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == \
        [f"error: checkpoint file not found: {str(tmp_path / 'no.pth')!r}"]
    assert not out.exists()


@pytest.mark.parametrize('args, message', [
    (['--to', 'EvalBn'], "--to 'EvalBn' is not a registered BN-like norm type; choices: "),
    (['--shape', '1', '3', '96', '100'], "H and W must be multiples of the "
     "data_preprocessor's pad_size_divisor, 32"),
    (['--shape', '1', '4', '128', '128'], 'the model cannot take inputs of shape '
     '(1, 4, 128, 128): Given groups=1'),
])
def test_bad_input_is_one_error_line(args, message, trained_toy, tmp_path, capsys):
    out = tmp_path / 'out.onnx'
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [TOY_BN_CONFIG, trained_toy[2], str(out), *args])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], lines
    assert not out.exists()


def test_output_equal_to_the_checkpoint_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'weights')
    with pytest.raises(SystemExit) as exit_:
        cli.run(main, [TOY_BN_CONFIG, str(checkpoint), str(checkpoint)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: output ') and \
        'is the input' in lines[0]
    assert checkpoint.read_bytes() == b'weights'

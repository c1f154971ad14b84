"""The toy Mask R-CNN (synthetic shapes with their masks) trains and evaluates bbox and
segm mAP end to end with the tools, with BN and with ConvWC + MABN in every part."""
import os.path as osp

import pytest

from conftest import REPO, SHORT, data_root_options, run_tool


@pytest.mark.parametrize('norm', ['bn', 'mabn'])
def test_train_and_test_report_bbox_and_segm(norm, tiny_synthetic, tmp_path):
    config = osp.join(REPO, 'configs', 'toy', f'mask_rcnn_r18_fpn_{norm}_toy.py')
    options = [o for o in SHORT if not o.startswith('model.test_cfg')]
    options += [*data_root_options(tiny_synthetic), 'model.test_cfg.rcnn.score_thr=0.0']
    train = run_tool(['tools/train.py', config, '--work-dir', str(tmp_path),
                      '--cfg-options', *options], timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    test = run_tool(['tools/test.py', config, str(tmp_path / 'iter_4.pth'), '--work-dir',
                     str(tmp_path), '--cfg-options', *options], timeout=900)
    assert test.returncode == 0, test.stderr[-3000:]
    for metric in ('coco/bbox_mAP:', 'coco/segm_mAP:', 'coco/segm_mAP_50:'):
        assert metric in test.stdout

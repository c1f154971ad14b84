"""Train a few iterations with tools/train.py, evaluate with tools/test.py, resume."""
import os

import torch
from mmengine.fileio import load

from conftest import SHORT, TOY_BN_CONFIG, data_root_options, run_tool


def test_train_save_evaluate_and_resume(tiny_synthetic, tmp_path):
    work_dir = str(tmp_path / 'work')
    options = ['--cfg-options', *SHORT, *data_root_options(tiny_synthetic)]
    train = run_tool(['tools/train.py', TOY_BN_CONFIG, '--work-dir', work_dir, *options])
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = os.path.join(work_dir, 'iter_4.pth')
    assert os.path.isfile(checkpoint)
    assert 'coco/bbox_mAP_50' in train.stdout  # validation ran at the end of training

    # the checkpoint is mmengine's full training state and loads with torch's defaults
    state = torch.load(checkpoint, map_location='cpu')
    assert state['meta']['iter'] == 4 and 'message_hub' in state and 'optimizer' in state

    test = run_tool(['tools/test.py', TOY_BN_CONFIG, checkpoint, '--work-dir', work_dir,
                     '--out', str(tmp_path / 'predictions.pkl'), *options])
    assert test.returncode == 0, test.stderr[-3000:]
    for metric in ('coco/bbox_mAP:', 'coco/bbox_mAP_50:', 'coco/bbox_mAP_75:'):
        assert metric in test.stdout
    predictions = load(str(tmp_path / 'predictions.pkl'))  # mmdet's DumpDetResults format
    assert len(predictions) == 8 and 'pred_instances' in predictions[0]
    assert sorted(os.listdir(tmp_path)) == ['predictions.pkl', 'work']  # no temporary

    resumed = run_tool(['tools/train.py', TOY_BN_CONFIG, '--work-dir', work_dir, '--resume',
                        *options, 'train_cfg.max_iters=6', 'train_cfg.val_interval=6',
                        'default_hooks.checkpoint.interval=6'])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed epoch: 0, iter: 4' in resumed.stdout
    assert 'Iter(train) [5/6]' in resumed.stdout and 'Iter(train) [1/6]' not in resumed.stdout
    assert os.path.isfile(os.path.join(work_dir, 'iter_6.pth'))

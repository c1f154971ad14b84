"""The per-level MABN toy (configs/toy/retinanet_r18_fpn_mabn_2img_all_toy.py) through the
tools: trains and evaluates with tools/train.py and tools/test.py, and fine-tunes from a
checkpoint whose head norms were shared across the levels."""
import os
import os.path as osp

import torch

from conftest import REPO, SHORT, data_root_options, run_tool

CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_mabn_2img_all_toy.py')
# the head's MABN moving averages within the 4 iterations (buffer 2, from iteration 3)
MABN_SHORT = [f'model.bbox_head.norm_cfg.{k}=2'
              for k in ('buffer_size', 'warmup_iters', 'renorm_iters')]


def _options(root):
    return ['--cfg-options', *SHORT, *data_root_options(root), *MABN_SHORT]


def test_trains_evaluates_and_loads_a_shared_head(tiny_synthetic, tmp_path):
    work_dir = str(tmp_path / 'per_level')
    train = run_tool(['tools/train.py', CONFIG, '--work-dir', work_dir,
                      *_options(tiny_synthetic)])
    assert train.returncode == 0, train.stderr[-3000:]
    checkpoint = osp.join(work_dir, 'iter_4.pth')
    state = torch.load(checkpoint, map_location='cpu')['state_dict']
    levels = [k for k in state if k.startswith('bbox_head.cls_convs.0.bn.') and
              k.endswith('.num_batches_tracked')]
    assert len(levels) == 4
    assert all(state[k].item() == 4 for k in levels)  # each level stepped once per iteration
    test = run_tool(['tools/test.py', CONFIG, checkpoint, '--work-dir', work_dir,
                     *_options(tiny_synthetic)])
    assert test.returncode == 0, test.stderr[-3000:]
    assert 'coco/bbox_mAP:' in test.stdout

    # a RetinaHead with MABN shared across the levels, then fine-tuned per level from it
    shared_dir = str(tmp_path / 'shared')
    shared = run_tool(['tools/train.py', CONFIG, '--work-dir', shared_dir,
                       *_options(tiny_synthetic), 'model.bbox_head.type=RetinaHead'])
    assert shared.returncode == 0, shared.stderr[-3000:]
    tuned = run_tool(['tools/train.py', CONFIG, '--work-dir', str(tmp_path / 'tuned'),
                      *_options(tiny_synthetic),
                      f"load_from={osp.join(shared_dir, 'iter_4.pth')}"])
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert tuned.stdout.count('loaded the shared norm of the checkpoint into each of its '
                              '4 levels') == 4
    assert 'missing keys' not in tuned.stdout + tuned.stderr
    assert os.path.isfile(osp.join(str(tmp_path / 'tuned'), 'iter_4.pth'))

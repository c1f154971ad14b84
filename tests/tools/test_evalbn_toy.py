"""The EvalBN toy story end to end with the tools: BN toy -> EvalBN fine-tune -> test.

A few iterations each on the tiny synthetic dataset; also converts the BN checkpoint with
tools/convert_checkpoint.py and inspects the fine-tuned one with tools/inspect_norms.py.
"""
import os.path as osp

import torch
from mmengine.config import Config

from conftest import REPO, SHORT, TOY_BN_CONFIG, data_root_options, run_tool

TOY_EVALBN_CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_evalbn_toy.py')


def backbone_norm_state(path):
    state = torch.load(path, map_location='cpu')['state_dict']
    return {k: v for k, v in state.items() if k.startswith('backbone.') and
            k.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}


def test_load_from_is_the_bn_toys_last_checkpoint():
    bn, evalbn = Config.fromfile(TOY_BN_CONFIG), Config.fromfile(TOY_EVALBN_CONFIG)
    assert evalbn.load_from == \
        f'work_dirs/retinanet_r18_fpn_bn_toy/iter_{bn.train_cfg.max_iters}.pth'
    assert evalbn.model.backbone.norm_cfg.type == 'EvalBN'


def test_fine_tune_from_bn_toy_and_evaluate(tiny_synthetic, tmp_path):
    data = data_root_options(tiny_synthetic)
    bn_dir, ft_dir = str(tmp_path / 'bn'), str(tmp_path / 'evalbn')
    bn = run_tool(['tools/train.py', TOY_BN_CONFIG, '--work-dir', bn_dir,
                   '--cfg-options', *SHORT, *data])
    assert bn.returncode == 0, bn.stderr[-3000:]
    bn_ckpt = osp.join(bn_dir, 'iter_4.pth')

    # the conversion tool: same tensors, now meant for EvalBN (config read from the ckpt)
    converted = str(tmp_path / 'evalbn_init.pth')
    conv = run_tool(['tools/convert_checkpoint.py', bn_ckpt, converted, '--to', 'EvalBN'])
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert 'EvalBN' in conv.stdout and 'eval-mode maps unchanged' in conv.stdout + conv.stderr
    assert backbone_norm_state(converted).keys() == backbone_norm_state(bn_ckpt).keys()

    ft = run_tool(['tools/train.py', TOY_EVALBN_CONFIG, '--work-dir', ft_dir,
                   '--cfg-options', *SHORT, *data, f'load_from={bn_ckpt}',
                   'custom_hooks.0.interval=1'])
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert 'Load checkpoint from' in ft.stdout and 'coco/bbox_mAP_50' in ft.stdout
    ft_ckpt = osp.join(ft_dir, 'iter_4.pth')
    before, after = backbone_norm_state(bn_ckpt), backbone_norm_state(ft_ckpt)
    assert before.keys() == after.keys() and len(before) == 60
    for key, value in before.items():
        assert torch.equal(after[key], value), f'{key} moved during the EvalBN fine-tune'

    test = run_tool(['tools/test.py', TOY_EVALBN_CONFIG, ft_ckpt, '--work-dir', ft_dir,
                     '--cfg-options', *SHORT, *data])
    assert test.returncode == 0, test.stderr[-3000:]
    assert 'coco/bbox_mAP:' in test.stdout and 'coco/bbox_mAP_50:' in test.stdout

    inspect = run_tool(['tools/inspect_norms.py', '--checkpoint', ft_ckpt, '--iters', '1'])
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    assert 'backbone.layer1.0.bn1' in inspect.stdout and 'EvalBN' in inspect.stdout
    assert 'every layer meant to be frozen stayed frozen' in inspect.stdout

"""The README's workflows in its order, as a newcomer runs them from a fresh clone, on a
shortened schedule and the tiny synthetic dataset: the demo's training into the BN toy's
work dir, the EvalBN fine-tune from its checkpoint, inspect, convert, test, distributed
training. Each step runs the tool as the README writes it, from a directory that stands in
for the clone (``work_dirs/`` is relative to it)."""
import os.path as osp
import sys

import torch
from mmengine.config import Config

from conftest import REPO, SHORT, TOY_BN_CONFIG, data_root_options, run_tool
from dist_utils import free_port, run_launcher
from norm_helpers import STATISTICS

TOY_EVALBN_CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_evalbn_toy.py')
TOY_SYNCBN_CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_syncbn_toy.py')
DEMO_WORK_DIR = 'work_dirs/retinanet_r18_fpn_bn_toy'


def backbone_norm_state(path):
    state = torch.load(path, map_location='cpu')['state_dict']
    return {k: v for k, v in state.items() if k.startswith('backbone.') and
            k.rsplit('.', 1)[-1] in STATISTICS}


def metric_line(stdout):
    """The summary line the tools print last (``...: coco/bbox_mAP=..., ...; ... min``)."""
    return stdout.strip().splitlines()[-1]


def test_the_evalbn_fine_tune_loads_the_demos_last_checkpoint():
    bn, evalbn = Config.fromfile(TOY_BN_CONFIG), Config.fromfile(TOY_EVALBN_CONFIG)
    assert evalbn.load_from == f'{DEMO_WORK_DIR}/iter_{bn.train_cfg.max_iters}.pth'
    assert evalbn.model.backbone.norm_cfg.type == 'EvalBN'
    makefile = open(osp.join(REPO, 'Makefile')).read()
    assert f'DEMO_WORK_DIR ?= {DEMO_WORK_DIR}' in makefile


def test_readme_workflows_in_order(tiny_synthetic, tmp_path):
    clone = str(tmp_path)
    short = ['--cfg-options', *SHORT, *data_root_options(tiny_synthetic)]

    def tool(name, *args):
        result = run_tool([osp.join(REPO, 'tools', name), *args], cwd=clone)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    # make demo: train into the BN toy's work dir, one summary line at the end
    demo = tool('train.py', TOY_BN_CONFIG, '--work-dir', DEMO_WORK_DIR, *short)
    assert metric_line(demo.stdout).startswith(f'trained {TOY_BN_CONFIG}: coco/bbox_mAP=')
    bn_ckpt = osp.join(DEMO_WORK_DIR, 'iter_4.pth')

    # the EvalBN fine-tune: its load_from is the full demo's checkpoint; after a shortened
    # demo it stops at once with one clean line naming the option to pass, which works
    missing = run_tool([osp.join(REPO, 'tools', 'train.py'), TOY_EVALBN_CONFIG, *short],
                       cwd=clone)
    assert missing.returncode == 2 and missing.stdout == '', missing.stdout[-3000:]
    assert missing.stderr.strip() == (
        f"error: load_from='{DEMO_WORK_DIR}/iter_1500.pth' not found; the latest checkpoint "
        f'of that run is {bn_ckpt}: pass --cfg-options load_from={bn_ckpt}')
    ft_dir = 'work_dirs/evalbn'
    ft = tool('train.py', TOY_EVALBN_CONFIG, '--work-dir', ft_dir, *short,
              f'load_from={bn_ckpt}', 'custom_hooks.0.interval=1')
    assert 'Load checkpoint from' in ft.stdout
    ft_ckpt = osp.join(clone, ft_dir, 'iter_4.pth')
    before, after = backbone_norm_state(osp.join(clone, bn_ckpt)), backbone_norm_state(ft_ckpt)
    assert before.keys() == after.keys() and len(before) == 60
    for key, value in before.items():
        assert torch.equal(after[key], value), f'{key} moved during the EvalBN fine-tune'

    # inspect: is my BN really frozen?
    inspect = tool('inspect_norms.py', TOY_EVALBN_CONFIG, '--checkpoint', ft_ckpt,
                   '--iters', '1', *short)
    assert 'backbone.layer1.0.bn1' in inspect.stdout and 'EvalBN' in inspect.stdout
    assert 'every layer meant to be frozen stayed frozen' in inspect.stdout

    # convert the BN checkpoint for EvalBN; test both: the same detector, the same numbers
    converted = osp.join(clone, 'evalbn_init.pth')
    conv = tool('convert_checkpoint.py', bn_ckpt, converted, '--to', 'EvalBN', '--config',
                osp.join(DEMO_WORK_DIR, osp.basename(TOY_BN_CONFIG)))  # the one the run dumped
    assert 'eval-mode maps unchanged' in conv.stdout + conv.stderr
    assert backbone_norm_state(converted).keys() == before.keys()
    test_bn = tool('test.py', TOY_BN_CONFIG, bn_ckpt, *short)
    test_evalbn = tool('test.py', TOY_EVALBN_CONFIG, converted, *short)
    assert 'coco/bbox_mAP=' in metric_line(test_bn.stdout)
    assert metric_line(test_bn.stdout).split(': ', 1)[1].rsplit(';', 1)[0] == \
        metric_line(test_evalbn.stdout).split(': ', 1)[1].rsplit(';', 1)[0]

    # distributed training: 2 gloo processes with PortableSyncBN
    dist = run_launcher(['bash', osp.join(REPO, 'tools', 'dist_train.sh'), TOY_SYNCBN_CONFIG,
                         '2', *short, 'train_cfg.val_begin=100'],
                        cwd=clone, timeout=600,
                        env=dict(PYTHON=sys.executable, PORT=str(free_port())))
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert 'Distributed training: True' in dist.stdout + dist.stderr
    assert osp.isfile(osp.join(clone, 'work_dirs', 'retinanet_r18_fpn_syncbn_toy',
                               'iter_4.pth'))

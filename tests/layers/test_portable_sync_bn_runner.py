"""PortableSyncBN with mmengine's Runner: the ``sync_bn`` config key, and a 2-process run."""
import os.path as osp
import sys

import mmengine.model
import mmengine.runner.runner
import pytest
import torch
from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from conftest import REPO, data_root_options
from dist_utils import free_port, run_launcher
from mmdet_bnplug.layers.portable_sync_bn import PortableSyncBN
from mmdet_bnplug.patches import sync_bn_conversion


class UserSyncBN(PortableSyncBN):
    """A user's subclass of one of the package's layers: kept as well."""


def plugin_norm_classes():
    """Every BN-like layer the package registers, whatever the other modules add."""
    return sorted((cls for cls in MODELS.module_dict.values()
                   if isinstance(cls, type) and issubclass(cls, _BatchNorm)
                   and cls.__module__.startswith('mmdet_bnplug.')), key=lambda c: c.__name__)


def model_with_every_norm():
    plugin = [cls(8) for cls in plugin_norm_classes()] + [UserSyncBN(8)]
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                         nn.Sequential(nn.BatchNorm1d(8), *plugin)), plugin


@pytest.mark.parametrize('convert', [mmengine.runner.runner.convert_sync_batchnorm,
                                     mmengine.model.convert_sync_batchnorm],
                         ids=['runner', 'mmengine.model'])
def test_sync_bn_key_keeps_plugin_layers_converts_the_rest(convert):
    assert PortableSyncBN in plugin_norm_classes()
    model, plugin = model_with_every_norm()
    converted = convert(model, 'torch')
    assert type(converted[1]) is nn.SyncBatchNorm
    assert type(converted[2][0]) is nn.SyncBatchNorm
    assert list(converted[2])[1:] == plugin  # the very same modules, untouched


def test_without_the_fix_mmengine_would_replace_them():
    """The trap the module guards against: mmengine's own converter."""
    model, plugin = model_with_every_norm()
    converted = sync_bn_conversion._mmengine_convert(model, 'torch')
    assert all(type(m) is nn.SyncBatchNorm for m in list(converted[2])[1:])


def test_sync_bn_key_bad_value_is_a_clear_error():
    with pytest.raises(ValueError, match='sync_bn should be "torch" or "mmcv"'):
        mmengine.runner.runner.convert_sync_batchnorm(nn.Sequential(PortableSyncBN(4)), 'apex')


SYNCBN_TOY = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_syncbn_toy.py')
SYNCBN_COCO = osp.join(REPO, 'configs', 'retinanet', 'retinanet_r50_fpn_syncbn_1x_coco.py')


@pytest.mark.parametrize('config', [SYNCBN_TOY, SYNCBN_COCO], ids=['toy', 'coco'])
def test_syncbn_configs_build_portable_sync_bn_backbones(config):
    """Every BN layer of the backbone is a trained (not norm_eval) PortableSyncBN."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    cfg = Config.fromfile(config)
    assert cfg.model.backbone.norm_cfg == dict(type='PortableSyncBN', requires_grad=True)
    cfg.model.backbone.init_cfg = None  # no pretrained download
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MMDET_MODELS.build(cfg.model.backbone)
    backbone.train()  # mmdet's ResNet.train returns None
    norms = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(type(m) is PortableSyncBN for m in norms)
    assert backbone.layer4[0].bn1.training  # trained, unlike the default norm_eval=True
QUICK = ['default_hooks.logger.interval=1', 'model.test_cfg.score_thr=0.0',
         *(f'{loader}.{key}' for loader in ('train_dataloader', 'val_dataloader',
                                            'test_dataloader')
           for key in ('num_workers=0', 'persistent_workers=False'))]


def test_two_process_toy_training_then_evaluation(tiny_synthetic, tmp_path):
    """tools/dist_train.sh (2 gloo processes, with ``sync_bn='torch'`` set: the
    PortableSyncBN layers must survive it on CPU), then tools/dist_test.sh."""
    work_dir = str(tmp_path / 'work')
    options = [*QUICK, *data_root_options(tiny_synthetic)]
    env = dict(PYTHON=sys.executable)
    train = run_launcher(
        ['bash', 'tools/dist_train.sh', SYNCBN_TOY, '2', '--work-dir', work_dir,
         '--cfg-options', *options, 'sync_bn=torch', 'train_cfg.max_iters=3',
         'train_cfg.val_begin=100', 'default_hooks.checkpoint.interval=3',
         'train_dataloader.batch_size=3'],
        cwd=REPO, timeout=600, env=dict(env, PORT=str(free_port())))
    assert train.returncode == 0, train.stderr[-3000:]
    log = train.stdout + train.stderr
    assert 'Distributed training: True' in log and 'GPU number: 2' in log  # world size
    assert 'kept 20 mmdet_bnplug norm layers unconverted (PortableSyncBN x20)' in log
    assert 'Iter(train) [3/3]' in log
    state = torch.load(osp.join(work_dir, 'iter_3.pth'), map_location='cpu')['state_dict']
    assert state['backbone.bn1.num_batches_tracked'] == 3

    test = run_launcher(
        ['bash', 'tools/dist_test.sh', SYNCBN_TOY, osp.join(work_dir, 'iter_3.pth'), '2',
         '--work-dir', work_dir, '--cfg-options', *options],
        cwd=REPO, timeout=600, env=dict(env, PORT=str(free_port())))
    assert test.returncode == 0, test.stderr[-3000:]
    assert 'coco/bbox_mAP_50:' in test.stdout + test.stderr

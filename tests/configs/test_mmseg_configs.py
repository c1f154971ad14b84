"""The mmseg configs (optional extra ``mmseg``): built through the root registry with
custom_imports, with the plugin's layers where the config puts them, and a training step
on synthetic input."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

from conftest import REPO

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'mmseg', '*.py')))


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p) for p in CONFIGS])
def test_builds_and_steps(path):
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(path)
    assert 'mmdet_bnplug' in cfg.custom_imports['imports']
    init_default_scope('mmseg')
    cfg.model.data_preprocessor.size = (64, 64)
    model = MODELS.build(cfg.model)
    norm = cfg.model.backbone.norm_cfg.type
    for part in (model.backbone, model.decode_head, model.auxiliary_head):
        assert any(type(m).__name__ == norm for m in part.modules())
    if cfg.model.backbone.get('conv_cfg'):
        assert any(type(m).__name__ == 'ConvWC' for m in model.backbone.modules())
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='SGD', lr=0.01)))
    g = torch.Generator().manual_seed(0)
    data = dict(
        inputs=[torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=g)
                for _ in range(2)],
        data_samples=[SegDataSample(
            gt_sem_seg=PixelData(data=torch.randint(0, 19, (1, 64, 64), generator=g)),
            metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64))) for _ in range(2)])
    model.train()
    losses = model.train_step(data, wrapper)
    assert torch.isfinite(losses['loss'])

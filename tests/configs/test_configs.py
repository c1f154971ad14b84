"""Every shipped config loads (mmdet:: inheritance included) and its model builds."""
import glob
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config

from conftest import REPO
from run_config import check_norm_types

# mmdet configs (configs/mmseg/ and configs/mmpretrain/ have their own tests)
CONFIGS = sorted(p for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
                 if '/mmseg/' not in p and '/mmpretrain/' not in p)


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_loads_and_model_builds(path):
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(path)
    assert 'mmdet_bnplug' in cfg.custom_imports['imports']
    check_norm_types(cfg.model)
    model = MODELS.build(cfg.model)
    model.eval()
    size = 128 if '/toy/' in path else 256
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, size, size))
    assert len(feats) == cfg.model.neck.num_outs


@pytest.mark.parametrize('name', ['mask_rcnn_r50_fpn_mabn_scratch_2x_coco',
                                  'mask_rcnn_r50_fpn_mabn_finetune_2x_coco'])
def test_mabn_mask_rcnn_puts_mabn_and_convwc_where_the_paper_does(name):
    from mmdet_bnplug.layers import MABN, ConvWC
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'mask_rcnn', name + '.py'))
    model = MODELS.build(cfg.model)
    for part in ('backbone', 'neck', 'roi_head.bbox_head', 'roi_head.mask_head'):
        modules = list(model.get_submodule(part).modules())
        assert any(isinstance(m, MABN) for m in modules), part
        assert any(isinstance(m, ConvWC) for m in modules), part
        assert not any(type(m) is torch.nn.BatchNorm2d for m in modules), part
    assert type(model.roi_head.bbox_head).__name__ == 'Shared4Conv1FCBBoxHead'
    assert cfg.train_cfg.max_epochs == 24
    assert (cfg.model.backbone.init_cfg is None) == ('scratch' in name)

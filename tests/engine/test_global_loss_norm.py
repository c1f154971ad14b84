"""GlobalLossNormHook: which heads it makes global, and that one process is unchanged
(the distributed equality is tests/analysis/test_sync_check.py)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS
from torch import nn

import mmdet_bnplug  # noqa: F401
from conftest import REPO, on_dataset
from mmdet_bnplug.analysis.sync_check import build_model, global_batch, quiet_logs
from mmdet_bnplug.engine.hooks import global_loss_norm
from mmdet_bnplug.engine.hooks.global_loss_norm import loss_norm_report

TOY = osp.join(REPO, 'configs', 'toy')


def _losses(model, batch):
    torch.manual_seed(0)
    data = model.data_preprocessor(batch, True)
    data['inputs'] = data['inputs'].to(next(model.parameters()).dtype)
    return {k: v.detach() for k, v in model.parse_losses(model(**data, mode='loss'))[1].items()}


@pytest.mark.parametrize('config, double, expected', [
    ('retinanet_r18_fpn_bn_toy.py', True, [('bbox_head', 'RetinaHead', 'made global')]),
    ('mask_rcnn_r18_fpn_bn_toy.py', False, [('rpn_head', 'RPNHead', 'made global'),
                                     ('roi_head.bbox_head', 'Shared2FCBBoxHead',
                                      'made global'),
                                     ('roi_head.mask_head', 'FCNMaskHead', 'made global')]),
])
def test_one_process_is_unchanged(config, double, expected, tiny_synthetic):
    """Without a process group the wrapped heads compute exactly what they did (same
    seed for the random samplers)."""
    quiet_logs()
    cfg = on_dataset(Config.fromfile(osp.join(TOY, config)), tiny_synthetic)
    model = build_model(cfg, double=double)
    batch = global_batch(cfg, 2, seed=0)
    before = _losses(model, batch)
    assert global_loss_norm(model) == expected
    assert global_loss_norm(model) == expected  # idempotent: wrapped once
    after = _losses(model, batch)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_heads_without_a_rule_are_refused_or_reported():
    from mmdet.models.dense_heads import FCOSHead, FreeAnchorRetinaHead
    model = nn.ModuleDict(dict(
        free=FreeAnchorRetinaHead(num_classes=2, in_channels=8, feat_channels=8),
        fcos=FCOSHead(num_classes=2, in_channels=8, feat_channels=8, norm_cfg=None)))
    with pytest.raises(ValueError, match=r"no rule .*'free', 'FreeAnchorRetinaHead'"):
        global_loss_norm(model)
    assert loss_norm_report(model) == [('free', 'FreeAnchorRetinaHead', 'not covered'),
                                       ('fcos', 'FCOSHead', 'already global')]
    assert global_loss_norm(model, strict=False) == loss_norm_report(model)
    with pytest.raises(ValueError, match="GlobalLossNormHook: strict must be"):
        HOOKS.build(dict(type='GlobalLossNormHook', strict='yes'))

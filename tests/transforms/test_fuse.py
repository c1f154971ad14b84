"""fuse_norm: every supported norm folded into its conv; outputs unchanged to 1e-5."""
import copy

import pytest
import torch
from mmcv.cnn import ConvModule
from mmdet.models.backbones import ResNet, ResNetV1d
from mmdet.models.layers import FrozenBatchNorm2d
from torch import nn

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.transforms import convert_norm, fuse_norm, fuse_norm_report
from mmdet_bnplug.utils.bn_like import bn_like_layers
from norm_helpers import StandInConvWC, StandInMABN, max_rel_err, randomise_norms


def fused_vs_plain(model, x):
    randomise_norms(model)
    model.eval()  # (mmdet's ResNet.train returns None)
    fused = fuse_norm(copy.deepcopy(model))
    with torch.no_grad():
        expected, actual = model(x), fused(x)
    if isinstance(expected, tuple):
        expected, actual = torch.cat([e.flatten() for e in expected]), \
            torch.cat([a.flatten() for a in actual])
    return fused, max_rel_err(actual, expected)


@pytest.mark.parametrize('norm', ['BN', 'EvalBN', 'SyncBN', FrozenBatchNorm2d,
                                  StandInMABN])
def test_resnet_every_norm_folds(norm):
    model = ResNet(18, out_indices=(0, 1, 2, 3), norm_cfg=dict(type=norm))
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 64, 64))
    assert err < 1e-5
    assert not bn_like_layers(fused)
    assert type(fused.conv1) is nn.Conv2d and type(fused.bn1) is nn.Identity


def test_resnet_deep_stem_avg_down_and_mixed_norms():
    model = ResNetV1d(depth=18, out_indices=(3, ))
    randomise_norms(model)
    convert_norm(model, 'EvalBN', include='layer1.*')
    convert_norm(model, 'mmdet.FrozenBN', include='layer2.*')
    convert_norm(model, StandInMABN, include='stem.*')
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 64, 64))
    assert err < 1e-5 and not bn_like_layers(fused)
    assert isinstance(fused.layer2[0].downsample[2], nn.Identity)  # AvgPool, conv, norm


def test_convwc_with_mabn_protocol_becomes_plain_conv():
    model = nn.Sequential(StandInConvWC(3, 8, 3, padding=1), StandInMABN(8), nn.ReLU(),
                          StandInConvWC(8, 8, 3, stride=2, bias=True), StandInMABN(8))
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 16, 16))
    assert err < 1e-5
    assert [type(m) for m in fused] == [nn.Conv2d, nn.Identity, nn.ReLU, nn.Conv2d,
                                        nn.Identity]


@pytest.mark.parametrize('norm_cfg', [dict(type='BN'), dict(type='EvalBN'),
                                      dict(type=FrozenBatchNorm2d)])
def test_conv_module(norm_cfg):
    model = nn.Sequential(
        ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg),
        ConvModule(8, 8, 3, groups=2, dilation=2, padding=2, norm_cfg=norm_cfg,
                   act_cfg=None))
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 16, 16))
    assert err < 1e-5 and not bn_like_layers(fused)
    assert fused[0].with_norm and isinstance(fused[0].norm, nn.Identity)


def test_1d_3d_and_what_is_left_alone(caplog):
    def conv_module(order):
        return ConvModule(4, 4, 1, norm_cfg=dict(type='BN'), order=order)

    model = nn.Sequential(
        nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Unflatten(2, (1, 1, -1)),
        nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4), nn.Flatten(2), nn.Unflatten(2, (1, -1)),
        conv_module(('norm', 'conv', 'act')), conv_module(('conv', 'act', 'norm')),
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))  # a norm after an activation
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 10))
    assert err < 1e-5
    assert type(fused[0]) is nn.Conv1d and type(fused[3]) is nn.Conv3d
    assert [name for name, _ in bn_like_layers(fused)] == ['7.bn', '8.bn', '11']


def test_real_convwc_and_mabn_resnet():
    """ResNet with the real ConvWC + MABN."""
    model = ResNet(18, out_indices=(0, 1, 2, 3), conv_cfg=dict(type='ConvWC'),
                   norm_cfg=dict(type='MABN'))
    fused, err = fused_vs_plain(model, torch.randn(2, 3, 64, 64))
    assert err < 1e-5 and not bn_like_layers(fused)
    assert type(fused.conv1) is nn.Conv2d and type(fused.layer1[0].conv2) is nn.Conv2d


def test_report_says_why_each_norm_is_left():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8))
    left = fuse_norm_report(model)
    assert type(model[0]) is nn.Conv2d and type(model[1]) is nn.Identity
    assert left == {'3': 'no plain conv registered just before it',
                    '5': 'GroupNorm normalises with per-sample statistics at run time: '
                         'not foldable'}

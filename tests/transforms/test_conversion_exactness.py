"""Conversions that would change a model's maths are exact or refused: ConvWC + MABN to
plain BN (the centred kernels are stored), fuse_norm only where the data flow is proven."""
import copy

import torch
from mmdet.models.backbones import ResNet
from torch import nn

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.layers import MABN, ConvWC
from mmdet_bnplug.transforms import convert_norm, fuse_norm
from mmdet_bnplug.utils.bn_like import bn_like_layers
from norm_helpers import max_rel_err, randomise_norms

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _features(model, x=X):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return torch.cat([o.flatten() for o in out]) if isinstance(out, tuple) else out


def test_mabn_convwc_to_bn_loads_exactly_into_a_plain_conv_config():
    """A ConvWC + MABN ResNet converted to BN: its weights, loaded into the plain-conv BN
    ResNet, compute what the MABN model computes (the kernels are stored centred).
    Float64, so that "exact" means to rounding."""
    torch.manual_seed(0)
    mabn = ResNet(18, out_indices=(0, 1, 2, 3), conv_cfg=dict(type='ConvWC'),
                  norm_cfg=dict(type='MABN')).double()
    for module in mabn.modules():  # kernels with a clear per-filter mean
        if isinstance(module, ConvWC):
            with torch.no_grad():
                module.weight.add_(torch.rand(module.out_channels, 1, 1, 1))
    randomise_norms(mabn)
    x = X.double()
    expected = _features(mabn, x)
    convert_norm(mabn, 'BN')
    assert max_rel_err(_features(mabn, x), expected) < 1e-12
    plain = ResNet(18, out_indices=(0, 1, 2, 3), norm_cfg=dict(type='BN')).double()
    plain.load_state_dict(mabn.state_dict(), strict=True)
    assert max_rel_err(_features(plain, x), expected) < 1e-12


def test_mabn_to_mabn_keeps_uncentred_kernels():
    model = nn.Sequential(ConvWC(3, 4, 3), MABN(4))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    raw = model[0].weight.detach().clone()
    convert_norm(model, dict(type='MABN', buffer_size=4))
    assert torch.equal(model[0].weight, raw)


class BnBeforeConv(nn.Module):
    """Registers conv then bn, computes conv(bn(x))."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


class BnOfSum(BnBeforeConv):
    def forward(self, x):
        return self.bn(self.conv(x) + x)


class SumOfBoth(BnBeforeConv):
    def forward(self, x):
        return self.conv(x) + self.bn(x)


class ConvOutputReused(BnBeforeConv):
    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ConvThenBn(BnBeforeConv):
    def forward(self, x):
        return self.bn(self.conv(x))


def _fuse(model, **kwargs):
    randomise_norms(model)
    model.eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = model(x)
    fused = fuse_norm(copy.deepcopy(model), **kwargs)
    with torch.no_grad():
        return fused, max_rel_err(fused(x), expected)


def test_fuse_refuses_pairs_whose_data_flow_is_not_norm_of_conv():
    for cls in (BnBeforeConv, BnOfSum, SumOfBoth, ConvOutputReused):
        for kwargs in ({}, {'example_inputs': torch.randn(1, 4, 8, 8)}):
            fused, err = _fuse(cls(), **kwargs)
            assert err < 1e-6, (cls.__name__, kwargs, err)
            assert type(fused.bn) is nn.BatchNorm2d, (cls.__name__, kwargs)


def test_fuse_folds_unknown_modules_when_the_probe_proves_the_flow():
    fused, err = _fuse(ConvThenBn())
    assert type(fused.bn) is nn.BatchNorm2d  # unproven without a probe: left alone
    fused, err = _fuse(ConvThenBn(), example_inputs=torch.randn(1, 4, 8, 8))
    assert type(fused.bn) is nn.Identity and err < 1e-5


def test_fuse_logs_what_it_left_alone(capsys):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('bnplug-test-fuse-flow')
    _fuse(BnBeforeConv())
    out = capsys.readouterr().out
    assert 'not fused' in out and 'bn' in out and 'example_inputs' in out


def test_fuse_resnet_by_structure_and_on_a_probe_agree():
    model = ResNet(18, out_indices=(3, ), conv_cfg=dict(type='ConvWC'),
                   norm_cfg=dict(type='MABN'))
    randomise_norms(model)
    expected = _features(model)
    for kwargs in ({}, {'example_inputs': X[:1]}):
        fused = fuse_norm(copy.deepcopy(model), **kwargs)
        assert not bn_like_layers(fused)
        assert max_rel_err(_features(fused), expected) < 1e-5

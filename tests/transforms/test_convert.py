"""convert_norm: layer types swapped, statistics/affine carried, clear errors."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from mmdet.models.layers import FrozenBatchNorm2d
from mmengine.registry import MODELS
from torch import nn

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.layers.eval_bn import EvalBN
from mmdet_bnplug.transforms import convert_norm
from mmdet_bnplug.utils.bn_like import bn_like_layers
from norm_helpers import StandInMABN, randomise_norms


def resnet(**kwargs):
    model = ResNet(18, out_indices=(3, ), norm_eval=False, **kwargs)
    return randomise_norms(model)


def eval_out(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else out


X = torch.randn(1, 3, 64, 64)


@pytest.mark.parametrize('to, target', [
    ('EvalBN', EvalBN), (EvalBN, EvalBN), (dict(type='EvalBN'), EvalBN),
    ('SyncBN', MODELS.get('SyncBN')), ('BN', nn.BatchNorm2d),
    ('FrozenBN', FrozenBatchNorm2d), ('mmdet.FrozenBN', FrozenBatchNorm2d)])
def test_convert_all_layers_exactly(to, target):
    model = resnet(norm_cfg=dict(type='BN', requires_grad=False))
    expected = eval_out(model, X)
    state = model.state_dict()
    model.train()
    out = convert_norm(model, to)
    assert out is model
    layers = bn_like_layers(model)
    assert len(layers) == 20
    assert all(type(m) is target for _, m in layers)
    assert all(m.training for _, m in layers)  # training flag carried
    assert all(not p.requires_grad for _, m in layers for p in m.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(eval_out(model, X), expected, rtol=0, atol=0)


def test_include_exclude_and_requires_grad_override():
    model = resnet()
    convert_norm(model, dict(type='EvalBN', requires_grad=False),
                 include=['layer1.*', 'bn1'], exclude='layer1.1.*')
    kinds = {name: type(m) for name, m in bn_like_layers(model)}
    assert kinds['bn1'] is EvalBN and kinds['layer1.0.bn2'] is EvalBN
    assert kinds['layer1.1.bn1'] is nn.BatchNorm2d and kinds['layer2.0.bn1'] is nn.BatchNorm2d
    assert not model.layer1[0].bn1.weight.requires_grad
    assert model.layer2[0].bn1.weight.requires_grad


def test_round_trips_frozen_bn_and_dtype():
    model = resnet().to(torch.float64)
    expected = eval_out(model, X.double())
    convert_norm(model, 'FrozenBN')
    convert_norm(model, 'EvalBN')
    # FrozenBN's affine is a buffer: it comes back frozen
    assert not any(p.requires_grad for _, m in bn_like_layers(model) for p in m.parameters())
    assert model.bn1.weight.dtype == torch.float64
    convert_norm(model, 'BN')
    torch.testing.assert_close(eval_out(model, X.double()), expected, rtol=1e-12, atol=1e-12)


def test_mabn_protocol_paths():
    """Targets with from_batchnorm / sources with batchnorm_state (MABN's protocol)."""
    model = resnet()
    expected = eval_out(model, X)
    convert_norm(model, StandInMABN, include='layer*')
    assert type(model.layer1[0].bn1) is StandInMABN and type(model.bn1) is nn.BatchNorm2d
    assert model.layer1[0].bn1.running_mean.abs().max() == 0  # folded into the bias
    torch.testing.assert_close(eval_out(model, X), expected, rtol=1e-5, atol=1e-6)
    convert_norm(model, 'EvalBN')
    assert all(type(m) is EvalBN for _, m in bn_like_layers(model))
    torch.testing.assert_close(eval_out(model, X), expected, rtol=1e-5, atol=1e-6)


def test_root_and_shared_layers():
    bn = randomise_norms(nn.BatchNorm2d(4))
    new = convert_norm(bn, 'EvalBN')
    assert type(new) is EvalBN and torch.equal(new.running_var, bn.running_var)
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    convert_norm(model, 'EvalBN')
    assert type(model[1]) is EvalBN and model[1] is model[3]


def test_logs_eval_map_change(capsys):
    from mmengine.logging import MMLogger
    MMLogger.get_instance('bnplug-test-convert')  # a current logger that prints
    convert_norm(resnet(), 'EvalBN')
    assert '20 layers -> EvalBN; eval-mode maps unchanged' in capsys.readouterr().out
    convert_norm(resnet(), dict(type='EvalBN', eps=0.1))  # kwargs override carried eps
    assert 'largest relative change of an eval-mode map: ' in capsys.readouterr().out


def test_clear_errors():
    model = resnet()
    with pytest.raises(ValueError, match=r"unknown target type 'EvalBn'.*EvalBN"):
        convert_norm(model, 'EvalBn')
    with pytest.raises(ValueError, match="unknown target type 'GN'"):
        convert_norm(model, 'GN')  # registered, but not BN-like
    with pytest.raises(ValueError, match=r"include pattern 'backbone\.\*' matches no"):
        convert_norm(model, 'EvalBN', include='backbone.*')
    with pytest.raises(ValueError, match="exclude pattern 'nothing' matches no"):
        convert_norm(model, 'EvalBN', exclude=['layer1.*', 'nothing'])
    with pytest.raises(ValueError, match='leave no layer'):
        convert_norm(model, 'EvalBN', include='layer1.*', exclude='layer1.*')
    with pytest.raises(ValueError, match='no BN-like layers'):
        convert_norm(nn.Conv2d(3, 3, 1), 'EvalBN')
    with pytest.raises(ValueError, match='no running statistics'):
        convert_norm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), 'EvalBN')
    assert all(type(m) is nn.BatchNorm2d for _, m in bn_like_layers(model))


def test_real_mabn_and_portable_sync_bn():
    """The same paths with the real layers."""
    model = resnet()
    expected = eval_out(model, X)
    convert_norm(model, 'PortableSyncBN')
    assert type(model.bn1).__name__ == 'PortableSyncBN'
    torch.testing.assert_close(eval_out(model, X), expected, rtol=0, atol=0)
    convert_norm(model, dict(type='MABN', buffer_size=4), include='layer*')
    assert type(model.layer1[0].bn1).__name__ == 'MABN'
    assert model.layer1[0].bn1.buffer_size == 4
    torch.testing.assert_close(eval_out(model, X), expected, rtol=1e-5, atol=1e-6)
    convert_norm(model, 'EvalBN')
    assert all(type(m) is EvalBN for _, m in bn_like_layers(model))
    torch.testing.assert_close(eval_out(model, X), expected, rtol=1e-5, atol=1e-6)

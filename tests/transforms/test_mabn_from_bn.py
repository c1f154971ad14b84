"""BN checkpoint -> ConvWC + MABN model: exact norms, measured ConvWC change."""
import pytest
import torch
from mmdet.registry import MODELS
from mmengine.runner.checkpoint import save_checkpoint

import mmdet_bnplug  # noqa: F401  (registers the layers)
from mabn_from_bn import main
from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.transforms.mabn_from_bn import bn_equivalent, output_change

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


def _resnet(conv, norm):
    return MODELS.build(dict(type='ResNet', depth=18, out_indices=(3, ), conv_cfg=conv,
                             norm_cfg=dict(type=norm), init_cfg=None))


@pytest.fixture(scope='module')
def bn_model():
    torch.manual_seed(0)
    model = _resnet(None, 'BN')
    for m in model.modules():  # a "trained" BN model: non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    model.eval()
    return model


@pytest.mark.filterwarnings('ignore:MABN. loading')
def test_norms_convert_exactly(bn_model):
    model = _resnet(None, 'MABN')  # plain convs: the conversion is eval-exact
    model.load_state_dict(bn_model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    change = output_change(model, x)
    assert change['conv'] == {} and len(change['norm']) == 20
    assert change['output'] < 1e-5 and max(change['norm'].values()) < 1e-5
    model.eval()
    torch.testing.assert_close(model(x), bn_model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings('ignore:MABN. loading')
def test_convwc_change_is_measured_against_the_bn_model(bn_model):
    model = _resnet(dict(type='ConvWC'), 'MABN')
    model.load_state_dict(bn_model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the reference is the BN model itself
        torch.testing.assert_close(bn_equivalent(model)(x), bn_model(x), rtol=1e-4,
                                   atol=1e-4)
        model.eval()
        direct = ((model(x)[0] - bn_model(x)[0]).norm() / bn_model(x)[0].norm())
    change = output_change(model, x)
    assert len(change['conv']) == 20 and len(change['norm']) == 20
    assert change['output'] == pytest.approx(direct.item(), rel=1e-4)
    assert change['output'] > 0.01  # centring does move a BN model's outputs
    assert all(v > 0 for v in change['conv'].values())


@pytest.mark.filterwarnings('ignore:MABN. loading')
def test_command_line(bn_model, tmp_path, capsys):
    config = tmp_path / 'mabn_r18.py'
    config.write_text("model = dict(type='ResNet', depth=18, out_indices=(3, ), "
                      "conv_cfg=dict(type='ConvWC'), norm_cfg=dict(type='MABN'), "
                      "init_cfg=None)\n")
    ckpt, out = tmp_path / 'bn.pth', tmp_path / 'mabn.pth'
    save_checkpoint({'state_dict': bn_model.state_dict()}, str(ckpt))
    main([str(config), str(ckpt), str(out), '--shape', '1', '3', '32', '32'])
    printed = capsys.readouterr().out
    assert 'whole forward:' in printed and 'layer4.1.bn2' in printed
    model = _resnet(dict(type='ConvWC'), 'MABN')
    model.load_state_dict(torch.load(out)['state_dict'], strict=True)
    mabn = [m for m in model.modules() if isinstance(m, MABN)]
    assert not any(m.running_mean.any() for m in mabn)

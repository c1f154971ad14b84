"""ConvWC: weight-centralised convolution, and ConvWC + MABN inside mmdet models."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer
from mmengine.registry import DefaultScope
from torch import nn

import mmdet_bnplug  # noqa: F401  (registers the layers)
from mmdet_bnplug.layers.conv_wc import ConvWC
from mmdet_bnplug.layers.mabn import MABN

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


def test_convolves_with_the_centred_kernel():
    torch.manual_seed(0)
    conv = ConvWC(4, 6, 3, stride=2, padding=1, groups=2, bias=True).double()
    w = conv.weight.detach()
    centred = w - w.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(conv.centred_weight, centred)
    assert conv.centred_weight.sum(dim=(1, 2, 3)).abs().max() < 1e-12
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, centred, conv.bias, 2, 1, 1, 2))
    # a plain conv with the centred kernel computes the same (what fuse_norm relies on)
    plain = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    plain.load_state_dict({'weight': conv.centred_weight.detach(), 'bias': conv.bias})
    torch.testing.assert_close(plain(x), conv(x))


def test_gradient_flows_through_the_centring():
    torch.manual_seed(0)
    conv = ConvWC(3, 4, 3, padding=1, bias=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(conv, {'weight': w}, (x, )),
        (x, conv.weight.detach().clone().requires_grad_()))
    conv(x).square().sum().backward()
    # the kernel gradient is centred too: a uniform shift of W[o] changes nothing
    assert conv.weight.grad.sum(dim=(1, 2, 3)).abs().max() < 1e-10


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_build_conv_layer_finds_it(scope):
    import mmdet.models  # noqa: F401
    with DefaultScope.overwrite_default_scope(scope):
        conv = build_conv_layer(dict(type='ConvWC'), 3, 8, 3, padding=1, bias=False)
    assert type(conv) is ConvWC and conv.bias is None and conv.padding == (1, 1)


def test_resnet_with_convwc_and_mabn_from_a_config():
    """The issue's config line builds, trains and evaluates."""
    from mmdet.registry import MODELS
    backbone = MODELS.build(
        dict(type='ResNet', depth=18, num_stages=4, out_indices=(0, 1, 2, 3),
             conv_cfg=dict(type='ConvWC'),
             norm_cfg=dict(type='MABN', buffer_size=2, warmup_iters=2, renorm_iters=3),
             norm_eval=False, init_cfg=None))
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in backbone.modules() if isinstance(m, MABN)]
    assert convs and all(type(m) is ConvWC for m in convs)
    assert len(norms) == 20 and backbone.norm1 is norms[0]
    backbone.init_weights()  # mmdet's Constant init (layer='_BatchNorm') accepts MABN
    backbone.train()
    for _ in range(4):  # warm-up, SMA, renorm
        outs = backbone(torch.randn(1, 3, 64, 64))
        sum(o.square().mean() for o in outs).backward()
    assert all(n.num_batches_tracked.item() == 4 for n in norms)
    assert all(torch.isfinite(p.grad).all() for p in backbone.parameters())
    backbone.eval()
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]
    assert all(n.num_batches_tracked.item() == 4 for n in norms)


@pytest.mark.parametrize('config', ['retinanet/retinanet_r50_fpn_mabn_1x_coco.py',
                                    'toy/retinanet_r18_fpn_mabn_toy.py'])
def test_configs_build_convwc_mabn_backbones(config):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from conftest import REPO
    register_all_modules()  # mmdet's default scope, as tools/train.py sets it
    cfg = Config.fromfile(f'{REPO}/configs/{config}')
    assert cfg.model.backbone.norm_eval is False
    cfg.model.backbone.init_cfg = None  # no download
    backbone = MODELS.build(cfg.model).backbone
    assert all(type(m) is ConvWC for m in backbone.modules() if isinstance(m, nn.Conv2d))
    assert all(type(m) is MABN for m in backbone.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))

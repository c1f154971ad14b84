"""NormEvalMixin / NormEval: norm_eval enforced on every BN-like layer, whatever happens."""
import random

import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.registry import MODELS, DefaultScope
from torch import nn

import mmdet_bnplug  # noqa: F401  (registers NormEval, EvalBN)
from mmdet_bnplug.layers.norm_eval import NormEvalMixin, apply_norm_eval
from mmdet_bnplug.utils.bn_like import bn_like_layers


class _PlainBackbone(nn.Module):
    """A backbone with no norm_eval of its own, mixing every BN-like kind, nested."""

    def __init__(self, channels=8):
        super().__init__()
        from mmdet.models.layers import FrozenBatchNorm2d
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                          build_norm_layer(dict(type='EvalBN'), channels)[1]),
            nn.Sequential(nn.Conv2d(channels, channels, 1),
                          nn.SyncBatchNorm(channels), nn.ReLU()),
            nn.Sequential(nn.Conv2d(channels, channels, 1), FrozenBatchNorm2d(channels)))
        self.head = nn.Conv1d(channels, 2, 1)
        self.head_norm = nn.BatchNorm1d(2)

    def forward(self, x):
        x = self.body(self.stem(x))
        return (self.head_norm(self.head(x.flatten(2))), )


BACKBONES = {
    'ResNet': dict(type='ResNet', depth=18, out_indices=(3, ),
                   norm_cfg=dict(type='BN', requires_grad=True)),
    # EfficientNet's own norm_eval only recognises nn.BatchNorm2d
    'EfficientNet': dict(type='EfficientNet', arch='b0', out_indices=(2, ),
                         norm_cfg=dict(type='EvalBN', eps=1e-3)),
    'plain': dict(type=_PlainBackbone),
}


def build(name, **kwargs):
    return MODELS.build(dict(type='NormEval', backbone=BACKBONES[name], **kwargs))


def perturb_statistics(model):
    with torch.no_grad():
        for _, layer in bn_like_layers(model):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2)


def snapshot(model):
    return {name: {k: v.clone() for k, v in layer.named_buffers()}
            for name, layer in bn_like_layers(model)}


def mode_calls(model, rng):
    """A random sequence of train()/eval() calls on the model and its submodules, ending
    with every BN-like layer itself put in training mode."""
    modules = list(model.modules())
    for _ in range(12):
        rng.choice(modules).train(rng.random() < 0.7)
    model.train()
    for _, layer in bn_like_layers(model):
        layer.train()


def train_steps(model, steps=3, size=32):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        out = model(torch.randn(2, 3, size, size) * 2 + 1)
        sum(o.square().mean() for o in out).backward()
        opt.step()


@pytest.mark.parametrize('name', list(BACKBONES))
@pytest.mark.parametrize('freeze_affine', [False, True])
def test_statistics_bit_identical_after_any_mode_calls_and_steps(name, freeze_affine):
    model = build(name, freeze_affine=freeze_affine)
    perturb_statistics(model)
    before = snapshot(model)
    affine0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # a rogue forward pre-hook that puts a block back in training mode
    second_norm = bn_like_layers(model)[1][0]
    rogue = model.get_submodule(second_norm.rpartition('.')[0])
    rogue.register_forward_pre_hook(lambda m, args: None if m.train() else None)
    rng = random.Random(0)
    for _ in range(3):
        mode_calls(model, rng)
        train_steps(model, steps=2)
    assert snapshot(model).keys() == before.keys()
    for layer_name, bufs in snapshot(model).items():
        for k, v in bufs.items():
            assert torch.equal(v, before[layer_name][k]), f'{layer_name}.{k} moved'
        assert not model.get_submodule(layer_name).training, layer_name
    for _, layer in bn_like_layers(model):
        for p in layer.parameters(recurse=False):
            assert p.requires_grad == (not freeze_affine)
    norm_params = {f'{n}.{k}' for n, layer in bn_like_layers(model)
                   for k, _ in layer.named_parameters(recurse=False)}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, affine0[n])}
    if freeze_affine:
        assert not moved & norm_params
    else:
        assert moved & norm_params  # affine trains when not frozen


def test_without_mixin_statistics_do_move():
    """The tests above can fail: the same story with plain EfficientNet moves BN stats."""
    from mmdet.models.backbones import EfficientNet
    model = EfficientNet(arch='b0', out_indices=(2, ), norm_eval=True,
                         norm_cfg=dict(type='BN', eps=1e-3))
    perturb_statistics(model)
    before = snapshot(model)
    model.train()
    model.layers[1].train()
    train_steps(model, steps=1)
    assert any(not torch.equal(v, before[n][k])
               for n, bufs in snapshot(model).items() for k, v in bufs.items())


@pytest.mark.parametrize('name', list(BACKBONES))
def test_state_dict_keys_unchanged(name):
    plain = MODELS.build(dict(BACKBONES[name], _scope_='mmdet'))
    wrapped = build(name)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert isinstance(wrapped, type(plain))
    wrapped.load_state_dict(plain.state_dict(), strict=True)


def test_backbone_gets_same_norm_eval_and_mixin_is_reusable():
    model = build('ResNet', norm_eval=False)
    assert model.norm_eval is False  # passed to ResNet too
    model.train()
    assert all(layer.training for _, layer in bn_like_layers(model))
    model.norm_eval = True  # switch on later: takes effect at train()
    model.train()
    assert not any(layer.training for _, layer in bn_like_layers(model))

    class Mine(NormEvalMixin, nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x)

    mine = Mine()
    mine.train()
    mine.bn.train()
    before = mine.bn.running_mean.clone()
    mine(torch.randn(2, 3, 4, 4) + 5)
    assert torch.equal(mine.bn.running_mean, before) and not mine.bn.training


def test_layers_swapped_in_later_are_covered():
    model = build('plain')
    model.train()
    model.stem[1] = nn.BatchNorm2d(8)  # e.g. convert_norm after the model was built
    before = model.stem[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8) + 3)
    assert torch.equal(model.stem[1].running_mean, before)


def test_apply_norm_eval_on_any_module_and_lifting_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    apply_norm_eval(model)
    model.train()
    bn = model[1][0]
    before = bn.running_mean.clone()
    model(torch.randn(2, 3, 4, 4) + 1)
    assert torch.equal(bn.running_mean, before)
    apply_norm_eval(model, norm_eval=False)
    model.train()
    model(torch.randn(2, 3, 4, 4) + 1)
    assert not torch.equal(bn.running_mean, before)


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_registry_with_and_without_scope(scope):
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(type='NormEval', backbone=dict(
            type='ResNet', depth=18, out_indices=(3, ))))
    assert type(model).__name__ == 'NormEvalResNet'


def test_clear_errors():
    with pytest.raises(KeyError, match="'NoSuchNet' is not registered"):
        MODELS.build(dict(type='NormEval', backbone=dict(type='NoSuchNet')))
    with pytest.raises(ValueError, match='set it once'):
        MODELS.build(dict(type='NormEval', norm_eval=True,
                          backbone=dict(BACKBONES['ResNet'], norm_eval=False)))

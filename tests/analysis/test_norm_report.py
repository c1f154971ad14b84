"""The inspection report and NormEvalCheckHook answer "is my BN really frozen?"."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.registry import HOOKS, MODELS
from torch import nn

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.analysis.norm_report import frozen_layers, inspect_norms, norm_table
from norm_helpers import randomise_norms


class Detector(nn.Module):
    """A backbone (with norm_eval) and a neck with plain BN that is meant to train."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = MODELS.build(backbone)
        self.neck = nn.Sequential(nn.Conv2d(self.out_channels(), 4, 1), nn.BatchNorm2d(4))

    def out_channels(self):
        self.backbone.eval()  # (mmdet backbones' train() returns None)
        with torch.no_grad():
            return self.backbone(torch.zeros(1, 3, 32, 32))[-1].shape[1]

    def forward(self, x):
        return self.neck(self.backbone(x)[-1])


def enforced():
    """ResNet-18 wrapped by NormEval: the backbone's BN statistics stay frozen."""
    return randomise_norms(Detector(dict(type='NormEval', backbone=dict(
        type='ResNet', depth=18, out_indices=(3, ), norm_cfg=dict(type='BN')))))


def leaky():
    """EfficientNet's own norm_eval only handles nn.BatchNorm2d: SyncBN layers leak."""
    return randomise_norms(Detector(dict(
        type='mmdet.EfficientNet', arch='b0', out_indices=(2, ), norm_eval=True,
        norm_cfg=dict(type='SyncBN', eps=1e-3))))


def train_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad()
        model(torch.randn(2, 3, 32, 32) + 1).square().mean().backward()
        opt.step()
    return step


def test_report_on_an_enforced_model():
    model = enforced()
    report = inspect_norms(model, train_step(model), iters=2)
    rows = {r['name']: r for r in norm_table(model)}
    assert rows['backbone.bn1']['frozen'] == 'norm_eval of backbone'
    assert rows['backbone.bn1']['training'] is False and rows['neck.1']['training'] is True
    assert rows['neck.1']['frozen'] == '' and rows['neck.1']['affine'] == 'trainable'
    lines = {line.split()[0]: line.split() for line in report.splitlines()[2:]}
    assert lines['backbone.layer1.0.bn1'][-1] == 'no'  # moved column
    assert lines['neck.1'][-1] != 'no'
    assert 'statistics of 1 of 21 layers moved' in report
    assert 'every layer meant to be frozen stayed frozen' in report


def test_report_finds_the_leak():
    model = leaky()
    report = inspect_norms(model, train_step(model), iters=1)
    assert 'meant to be frozen but moved: backbone.layers.0.bn' in report
    assert 'norm_eval of backbone' in report


def test_frozen_layers_include_and_types():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), MODELS.build(dict(type='EvalBN',
                                                                num_features=4)),
                          nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    assert frozen_layers(model, include=['3']) == {'1': 'EvalBN', '3': 'include'}


def fake_runner(model):
    warnings, infos = [], []
    return SimpleNamespace(model=model, iter=0, warnings=warnings, infos=infos,
                           logger=SimpleNamespace(warning=warnings.append, info=infos.append))


@pytest.mark.parametrize('action', ['error', 'warn'])
def test_hook_names_the_leaking_layers(action):
    model = leaky()
    hook = HOOKS.build(dict(type='NormEvalCheckHook', interval=2, action=action))
    runner = fake_runner(model)
    hook.before_train(runner)
    step = train_step(model)
    model.train()
    step()
    hook.after_train_iter(runner, 0)  # iteration 1: not a multiple of 2, no check
    runner.iter = 1
    step()
    if action == 'error':
        with pytest.raises(RuntimeError, match=r'backbone\.layers\.0\.bn \(SyncBatchNorm'):
            hook.after_train_iter(runner, 1)
    else:
        hook.after_train_iter(runner, 1)
        assert len(runner.warnings) == 1
        assert 'backbone.layers.0.bn (SyncBatchNorm, norm_eval of backbone) is in ' \
            'training mode' in runner.warnings[0]
        assert 'running_mean changed by up to' in runner.warnings[0]


def test_hook_passes_when_frozen_and_checks_at_the_end():
    model = enforced()
    hook = HOOKS.build(dict(type='NormEvalCheckHook', interval=1))
    runner = fake_runner(model)
    hook.before_train(runner)
    step = train_step(model)
    for i in range(2):
        model.train()
        step()
        runner.iter = i + 1
        hook.after_train_iter(runner, i)
    assert len(runner.infos) == 2 and 'iteration 2: 20 layers meant to be frozen are in ' \
        'eval mode and their buffers are unchanged' in runner.infos[1]
    with torch.no_grad():
        model.backbone.layer2[0].bn1.running_var.add_(1e-3)  # something moved it
    with pytest.raises(RuntimeError, match=r'layer2\.0\.bn1 .*running_var changed by up '
                                           r'to 0\.001'):
        hook.after_train(runner)


def test_hook_bad_arguments():
    with pytest.raises(ValueError, match="action must be 'error' or 'warn'"):
        HOOKS.build(dict(type='NormEvalCheckHook', action='raise'))
    with pytest.raises(ValueError, match='interval must be a positive int'):
        HOOKS.build(dict(type='NormEvalCheckHook', interval=0))

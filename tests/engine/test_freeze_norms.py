"""Freezing norms by name (FreezeNormsHook): the chosen layers stay frozen through
model.train(), a submodule's .train() and training iterations; the rest trains."""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS, MODELS, DefaultScope

import mmdet_bnplug  # noqa: F401
from conftest import REPO, SHORT, data_root_options, run_tool
from mmdet_bnplug.utils.bn_like import bn_like_layers

CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_bn_frozen_neck_toy.py')


def _model():
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(Config.fromfile(CONFIG).model)


def test_neck_stays_frozen_through_train_calls_and_forwards():
    model = _model()
    logs = []
    runner = SimpleNamespace(model=model, logger=SimpleNamespace(info=logs.append))
    HOOKS.build(dict(type='FreezeNormsHook', include='neck.*')).before_train(runner)
    assert 'norm layers kept in eval mode: neck.' in logs[0]
    neck = {n: m for n, m in bn_like_layers(model) if n.startswith('neck.')}
    rest = {n: m for n, m in bn_like_layers(model) if not n.startswith('neck.')}
    assert neck and rest
    before = {n: m.running_mean.clone() for n, m in neck.items()}
    model.train()
    for _ in range(3):
        model.neck.train()  # code calling .train() on a submodule between forwards
        model.neck.lateral_convs[0].train()
        model(torch.randn(2, 3, 64, 64), mode='tensor')
        assert all(not m.training for m in neck.values())
        assert all(m.training for m in rest.values())
    assert all(torch.equal(m.running_mean, before[n]) for n, m in neck.items())
    assert all(m.num_batches_tracked == 0 for m in neck.values())
    assert all(m.num_batches_tracked == 3 for m in rest.values())


def test_bad_patterns_are_named():
    model = _model()
    runner = SimpleNamespace(model=model, logger=SimpleNamespace(info=print))
    with pytest.raises(ValueError, match=r"include pattern 'nek\.\*' matches no BN-like"):
        HOOKS.build(dict(type='FreezeNormsHook', include=['nek.*'])).before_train(runner)
    with pytest.raises(ValueError, match='include must be a glob pattern'):
        HOOKS.build(dict(type='FreezeNormsHook', include=[None]))


def test_twenty_training_iterations_with_the_tools(tiny_synthetic, tmp_path):
    """tools/train.py for 20 iterations: the neck's statistics are those it started with,
    the backbone's moved; inspect_norms shows who froze what."""
    options = [o for o in SHORT if not o.startswith(('train_cfg', 'default_hooks.checkpoint'))]
    result = run_tool(['tools/train.py', CONFIG, '--work-dir', str(tmp_path), '--cfg-options',
                       *options, *data_root_options(tiny_synthetic), 'train_cfg.max_iters=20',
                       'train_cfg.val_interval=20', 'default_hooks.checkpoint.interval=20',
                       'custom_hooks.1.interval=5'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'FreezeNormsHook: ' in result.stdout and 'NormEvalCheckHook at iteration 20' in \
        result.stdout
    state = torch.load(str(tmp_path / 'iter_20.pth'), map_location='cpu')['state_dict']
    neck = {k: v for k, v in state.items() if k.startswith('neck.') and 'running' in k}
    assert neck and all(torch.equal(v, torch.zeros_like(v)) for k, v in neck.items()
                        if k.endswith('running_mean'))
    assert all(v == 0 for k, v in state.items()
               if k.startswith('neck.') and k.endswith('num_batches_tracked'))
    assert state['backbone.bn1.num_batches_tracked'] == 20
    inspect = run_tool(['tools/inspect_norms.py', CONFIG])
    assert inspect.returncode == 0, inspect.stderr[-2000:]
    assert 'FreezeNormsHook(neck.*)' in inspect.stdout

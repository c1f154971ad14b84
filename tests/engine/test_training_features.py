"""Gradient accumulation (NormMomentumPerStepHook) and mixed precision on the CPU
(AutocastOptimWrapper, tools/train.py --amp)."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import HOOKS
from torch import nn

import mmdet_bnplug  # noqa: F401
from conftest import SHORT, TOY_BN_CONFIG, data_root_options, run_tool
from mmdet_bnplug.engine.hooks.accumulation_momentum import per_micro_batch_momentum
from mmdet_bnplug.layers import MABN, EvalBN


def _runner(model, counts):
    logs = []
    return SimpleNamespace(model=model, optim_wrapper=SimpleNamespace(
        _accumulative_counts=counts), logger=SimpleNamespace(info=logs.append)), logs


def test_accumulation_hook_makes_k_micro_batches_decay_like_one_step():
    k, m = 4, 0.1
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=m), EvalBN(3), MABN(3, momentum=0.02),
                          nn.BatchNorm2d(3, momentum=None))
    runner, logs = _runner(model, k)
    HOOKS.build(dict(type='NormMomentumPerStepHook')).before_train(runner)
    assert model[0].momentum == pytest.approx(1 - 0.9**0.25)
    assert model[1].momentum == 0.0 and model[3].momentum is None
    assert model[2].momentum == pytest.approx(per_micro_batch_momentum(0.02, k))
    assert 'accumulative_counts=4; momentum of 2 norm layers' in logs[0]
    # k micro-batches with the same statistics move running_mean as one step with m
    bn, one_step = model[0], nn.BatchNorm2d(3, momentum=m)
    x = torch.randn(8, 3, 5, 5) + 2
    for _ in range(k):
        bn(x)
    one_step(x)
    torch.testing.assert_close(bn.running_mean, one_step.running_mean)
    torch.testing.assert_close(bn.running_var, one_step.running_var)


def test_accumulation_hook_without_accumulation_changes_nothing():
    model = nn.Sequential(nn.BatchNorm2d(3))
    runner, _ = _runner(model, 1)
    HOOKS.build(dict(type='NormMomentumPerStepHook')).before_train(runner)
    assert model[0].momentum == 0.1
    with pytest.raises(ValueError, match='accumulative_counts must be an integer >= 1'):
        HOOKS.build(dict(type='NormMomentumPerStepHook', accumulative_counts=0))


def test_autocast_optim_wrapper_runs_the_forward_in_bf16():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    wrapper = build_optim_wrapper(model, dict(type='AutocastOptimWrapper',
                                              optimizer=dict(type='SGD', lr=0.1)))
    with wrapper.optim_context(model):
        conv_out = model[0](torch.randn(2, 3, 8, 8))
    assert conv_out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of 'bfloat16', 'float16'"):
        build_optim_wrapper(model, dict(type='AutocastOptimWrapper', dtype='int8',
                                        optimizer=dict(type='SGD', lr=0.1)))


def test_train_tool_amp_on_cpu(tiny_synthetic, tmp_path):
    result = run_tool(['tools/train.py', TOY_BN_CONFIG, '--amp', '--work-dir', str(tmp_path),
                       '--cfg-options', *SHORT, *data_root_options(tiny_synthetic)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'bf16 autocast on the CPU' in result.stdout and 'Iter(train) [4/4]' in result.stdout

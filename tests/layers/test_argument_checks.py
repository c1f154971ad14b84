"""Bad arguments get a clear error naming the layer and the parameter, before any state
changes."""
import math

import pytest
import torch
from mmengine.registry import MODELS
from torch import nn

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.engine import NormEvalCheckHook
from mmdet_bnplug.layers import MABN, EvalBN, PortableSyncBN, build_norm_eval


@pytest.mark.parametrize('kwargs, match', [
    (dict(eps=math.inf), 'MABN: eps must be a finite number > 0'),
    (dict(eps=math.nan), 'MABN: eps'),
    (dict(eps=0), 'MABN: eps'),
    (dict(affine='False'), 'MABN: affine must be True or False'),
    (dict(momentum=0.98), r'MABN: momentum=0.98 is the weight of the \*new\* value.*0.02'),
    (dict(momentum=math.nan), 'MABN: momentum'),
    (dict(momentum=0), 'MABN: momentum'),
    (dict(buffer_size=0), 'MABN: buffer_size must be an integer >= 1'),
    (dict(buffer_size=True), 'MABN: buffer_size'),
    (dict(r_max=math.inf), 'MABN: r_max'),
])
def test_mabn_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MABN(4, **kwargs)


@pytest.mark.parametrize('cls', [EvalBN, PortableSyncBN])
@pytest.mark.parametrize('kwargs, param', [
    (dict(eps=math.nan), 'eps'), (dict(eps=-1.0), 'eps'), (dict(eps=math.inf), 'eps'),
    (dict(momentum=math.nan), 'momentum'), (dict(momentum=1.5), 'momentum'),
    (dict(momentum=-0.1), 'momentum'), (dict(affine='yes'), 'affine'),
])
def test_bn_arguments(cls, kwargs, param):
    with pytest.raises(ValueError, match=f'{cls.__name__}: {param} must be'):
        cls(4, **kwargs)


def test_bn_arguments_that_torch_accepts_still_pass():
    PortableSyncBN(4, momentum=None)
    EvalBN(4, momentum=0.0, eps=1e-3, affine=False)
    MABN(4, momentum=1.0)
    MABN(4, momentum=0.5)


def test_mabn_rejects_integer_input_before_advancing():
    layer = MABN(2)
    with pytest.raises(TypeError, match=r'MABN\(2\) expects a floating-point input'):
        layer(torch.ones(2, 2, 3, 3, dtype=torch.int64))
    assert layer.num_batches_tracked.item() == 0
    assert not layer.buffer_x2.any()


def test_mabn_buffer_size_mismatch_on_load_is_an_error():
    trained = MABN(3, buffer_size=4)
    trained(torch.randn(2, 3, 4, 4))
    fresh = MABN(3, buffer_size=8)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r'buffer_x2 has shape \(4, 3\).*'
                           r'Set buffer_size=4'):
            fresh.load_state_dict(trained.state_dict(), strict=strict)
    assert fresh.num_batches_tracked.item() == 0  # nothing half-loaded


@pytest.mark.parametrize('value', ['False', 0, None])
def test_norm_eval_flags_must_be_bools(value):
    with pytest.raises(ValueError, match='NormEval: norm_eval must be True or False'):
        build_norm_eval(dict(type='mmdet.ResNet', depth=18), norm_eval=value)
    with pytest.raises(ValueError, match='NormEval: freeze_affine must be True or False'):
        build_norm_eval(dict(type='mmdet.ResNet', depth=18), freeze_affine=value)


def test_norm_eval_check_hook_arguments():
    with pytest.raises(ValueError, match='interval must be a positive int'):
        NormEvalCheckHook(interval=True)
    with pytest.raises(ValueError, match='include must be a glob pattern'):
        NormEvalCheckHook(include=[3])

    class Runner:
        model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        logger = None

    hook = NormEvalCheckHook(include=['backbone.*'])
    with pytest.raises(ValueError, match=r"include pattern 'backbone\.\*' matches no"):
        hook.before_train(Runner())
    NormEvalCheckHook(include=['1']).before_train(Runner())


def test_registered_builders_validate_too():
    with pytest.raises(ValueError, match='MABN: eps'):
        MODELS.build(dict(type='MABN', num_features=4, eps=math.inf))

"""torch.compile (fullgraph) and torch.export of the layers, training and eval mode:
compiled training equals eager in outputs, gradients and every buffer."""
import copy

import pytest
import torch

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.layers import EvalBN, PortableSyncBN


def _layers():
    frozen = EvalBN(4).double()
    frozen.requires_grad_(False)
    return {'EvalBN': EvalBN(4).double(), 'EvalBN frozen': frozen,
            'PortableSyncBN': PortableSyncBN(4).double()}


def _randomised(layer):
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(_layers()))
def test_compiled_fullgraph_equals_eager_over_20_steps(name, training):
    torch._dynamo.reset()
    eager = _randomised(_layers()[name]).train(training)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
        dy = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(dy)
        yc.backward(dy)
        torch.testing.assert_close(yc, ye, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-12, atol=1e-12)
    for (n, pe), (_, pc) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
        if pe.requires_grad:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-12, atol=1e-12, msg=n)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_layer.state_dict()[key], value, rtol=1e-12,
                                   atol=0, msg=key)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('name', list(_layers()))
def test_export(name, training):
    layer = _randomised(_layers()[name]).train(training)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    reference = copy.deepcopy(layer)
    exported = torch.export.export(layer, (x, ))
    torch.testing.assert_close(exported.module()(x), reference(x), rtol=1e-12, atol=1e-12)

"""torch.compile (fullgraph, the default inductor backend) and torch.export of the
layers, training and eval mode: compiled training equals eager in outputs, gradients and
every buffer. (MABN on CPU: the compiled kernels; tests/ops covers the PyTorch ones.)"""
import copy

import pytest
import torch

import mmdet_bnplug  # noqa: F401
from mmdet_bnplug.layers import MABN, EvalBN, PortableSyncBN

# 20 steps visit MABN's phases: batch statistics, SMA, SMA + renorm
MABN_PHASES = dict(buffer_size=2, warmup_iters=4, renorm_iters=8, r_max=1.5)


def _layers():
    frozen = EvalBN(4).double()
    frozen.requires_grad_(False)
    return {'EvalBN': EvalBN(4).double(), 'EvalBN frozen': frozen,
            'PortableSyncBN': PortableSyncBN(4).double(),
            'MABN': MABN(4, **MABN_PHASES).double()}


def _randomised(layer):
    with torch.no_grad():
        if not isinstance(layer, MABN):  # MABN's running_mean stays 0 (its eval map)
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


def _compiled_equals_eager_on_rank(rank, world_size):
    """20 training steps of PortableSyncBN, compiled (fullgraph, inductor) and eager, on
    this rank's batch; the largest difference in outputs, gradients and buffers."""
    torch._dynamo.reset()
    eager = _randomised(PortableSyncBN(4).double()).train()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    g = torch.Generator().manual_seed(10 + rank)
    worst = 0.0
    for step in range(20):
        n = 1 + (step + rank) % 3  # unequal per-rank batches
        x = torch.randn(n, 4, 6, 6, generator=g, dtype=torch.float64) * 2 + 1
        dy = torch.randn(n, 4, 6, 6, generator=g, dtype=torch.float64)
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), compiled(xc)
        ye.backward(dy)
        yc.backward(dy)
        worst = max(worst, (yc - ye).abs().max().item(), (xc.grad - xe.grad).abs().max().item())
    for (_, pe), (_, pc) in zip(eager.named_parameters(), compiled_layer.named_parameters()):
        worst = max(worst, (pc.grad - pe.grad).abs().max().item())
    for key, value in eager.state_dict().items():
        worst = max(worst, (compiled_layer.state_dict()[key] - value).abs().max().item())
    return worst


def test_portable_sync_bn_compiled_on_two_gloo_processes_equals_eager():
    """fullgraph=True succeeds (the collectives trace, nothing reads a tensor on the
    host) and the compiled layer equals eager on each rank."""
    from dist_utils import run_distributed
    for worst in run_distributed(_compiled_equals_eager_on_rank, 2, timeout=600):
        assert worst < 1e-12

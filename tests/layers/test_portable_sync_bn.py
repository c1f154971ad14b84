"""PortableSyncBN in one process: plain BN, the global-statistics maths, errors, registry.

The synchronised behaviour on several processes is in test_portable_sync_bn_dist.py.
"""
import pytest
import torch
from mmcv.cnn import build_norm_layer
from mmengine.registry import DefaultScope
from torch import nn

from mmdet_bnplug.layers.portable_sync_bn import (
    PortableSyncBN,
    _GlobalBatchNorm,
    global_batch_stats,
)
from norm_helpers import emulated_cuda_kernels

# every test on both CPU implementations (conftest)
pytestmark = pytest.mark.usefixtures('sync_bn_cpu_path')

C = 4


BN_FOR_DIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def affine_pair(dtype=torch.float64, momentum=0.1, dim=4):
    """PortableSyncBN and torch's BN for ``dim``-D input with the same affine parameters."""
    layers = PortableSyncBN(C, momentum=momentum), BN_FOR_DIM[dim](C, momentum=momentum)
    for layer in layers:
        layer.to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, C))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, C))
    return layers


def global_bn(x, weight, bias, eps=1e-5):
    """The synchronised code path with no process group: this process is the group (and
    no layer: nothing to bound or name)."""
    mean, var, count = global_batch_stats(x, None)
    return _GlobalBatchNorm.apply(x, weight, bias, mean, var, torch.rsqrt(var + eps), count,
                                  None, eps, None)


@pytest.mark.parametrize('shape', [(6, C), (3, C, 5), (2, C, 3, 4), (2, C, 2, 3, 2)])
def test_without_process_group_equals_bn(shape):
    psbn, bn = affine_pair(momentum=None, dim=len(shape))  # cumulative average
    for mode in (True, True, False):
        psbn.train(mode), bn.train(mode)
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(shape, dtype=torch.float64)
        y, y2 = psbn(x), bn(x2)
        y.backward(dy), y2.backward(dy)
        torch.testing.assert_close(y, y2)
        torch.testing.assert_close(x.grad, x2.grad)
        torch.testing.assert_close(psbn.weight.grad, bn.weight.grad)
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(psbn.state_dict()[key], value)


@pytest.mark.parametrize('affine', [True, False])
def test_global_path_gradcheck(affine):
    x = (torch.randn(3, C, 2, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = torch.linspace(0.5, 2.0, C, dtype=torch.float64).requires_grad_() if affine else None
    b = torch.linspace(-1.0, 1.0, C, dtype=torch.float64).requires_grad_() if affine else None
    assert torch.autograd.gradcheck(global_bn, (x, w, b))


def test_global_path_equals_bn_float64():
    x = (torch.randn(5, C, 3, 3, dtype=torch.float64) * 4 - 3).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    psbn, bn = affine_pair()
    dy = torch.randn_like(x)
    y, y2 = global_bn(x, psbn.weight, psbn.bias), bn(x2)
    y.backward(dy), y2.backward(dy)
    torch.testing.assert_close(y, y2, atol=1e-12, rtol=1e-12)
    for got, ref in ((x.grad, x2.grad), (psbn.weight.grad, bn.weight.grad),
                     (psbn.bias.grad, bn.bias.grad)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_statistics_keep_precision_with_large_mean():
    """float32 input with mean 1e4 and spread 1: E[x^2] - E[x]^2 would lose everything."""
    x64 = torch.randn(8, C, 16, 16, dtype=torch.float64) + 1e4
    mean, var, count = global_batch_stats(x64.float(), None)
    ref_var, ref_mean = torch.var_mean(x64.float().double(), dim=(0, 2, 3), correction=0)
    assert count == 8 * 16 * 16 and mean.dtype == torch.float32
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)


def test_autocast_output_follows_input_statistics_fp32():
    psbn, _ = affine_pair(torch.float32)
    x = torch.randn(2, C, 4, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y_local = nn.Conv2d(C, C, 1)(x)  # bf16 activations, as in a mixed-precision model
        assert y_local.dtype == torch.bfloat16
        assert psbn(y_local).dtype == torch.bfloat16
        mean, var, _ = global_batch_stats(y_local, None)
        assert mean.dtype == var.dtype == torch.float32
        y = global_bn(y_local, psbn.weight, psbn.bias)
    assert y.dtype == torch.bfloat16
    ref = nn.functional.batch_norm(y_local.float(), None, None, psbn.weight, psbn.bias,
                                   training=True)
    torch.testing.assert_close(y.float(), ref, atol=0.02, rtol=0.01)
    assert psbn.running_mean.dtype == torch.float32


def test_zero_size_batch_empty_output_no_state_change_grads_reach_affine():
    psbn, _ = affine_pair()
    before = {k: v.clone() for k, v in psbn.state_dict().items()}
    x = torch.randn(0, C, 3, 3, dtype=torch.float64, requires_grad=True)
    y = psbn(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(psbn.weight.grad, torch.zeros(C, dtype=torch.float64))
    for key, value in psbn.state_dict().items():
        assert torch.equal(value, before[key])


@pytest.mark.parametrize('group_size', [0, -2, 1.5, True, '2'])
def test_bad_group_size_is_rejected(group_size):
    with pytest.raises(ValueError, match='group_size must be None .* or a positive int'):
        PortableSyncBN(C, group_size=group_size)


@pytest.mark.parametrize('shape', [(2, C + 1, 3, 3), (C, ), (2, 2 * C)])
def test_wrong_input_shape_is_rejected(shape):
    with pytest.raises(ValueError, match=rf'expected input of shape \(N, {C}, \*\)'):
        PortableSyncBN(C)(torch.randn(shape))


def test_state_dict_compatible_with_batchnorm2d_both_ways():
    psbn, bn = affine_pair(torch.float32)
    bn.train()(torch.randn(4, C, 3, 3))
    psbn.load_state_dict(bn.state_dict(), strict=True)
    fresh = nn.BatchNorm2d(C)
    fresh.load_state_dict(psbn.state_dict(), strict=True)
    assert torch.equal(fresh.running_var, bn.running_var)


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_built_by_mmcv_with_and_without_mmdet_scope(scope):
    cfg = dict(type='PortableSyncBN', requires_grad=False, group_size=2, momentum=0.05)
    if scope is None:
        name, layer = build_norm_layer(cfg, C, postfix=1)
    else:
        with DefaultScope.overwrite_default_scope(scope):
            name, layer = build_norm_layer(cfg, C, postfix=1)
    assert name == 'bn1' and isinstance(layer, PortableSyncBN)
    assert (layer.group_size, layer.momentum) == (2, 0.05)
    assert not layer.weight.requires_grad


@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_global_path_float32_with_large_mean_is_as_precise_as_bn(channels_last):
    """mean/std = 1e4 in float32: output and gradients of the global path against a
    float64 reference on the same input are within twice nn.BatchNorm2d's own error."""
    g = torch.Generator().manual_seed(0)
    x32 = (torch.randn(4, C, 12, 12, generator=g, dtype=torch.float64) + 1e4).float()
    if channels_last:
        x32 = x32.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x32.shape, generator=g).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def run(dtype, use_bn):
        bn = nn.BatchNorm2d(C).to(dtype)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, C))
            bn.bias.copy_(torch.linspace(-0.2, 0.3, C))
        x = x32.to(dtype).requires_grad_()
        y = bn(x) if use_bn else global_bn(x, bn.weight, bn.bias)
        y.backward(dy.to(dtype))
        return [t.detach().double() for t in (y, x.grad, bn.weight.grad, bn.bias.grad)]

    reference = run(torch.float64, True)
    ours, theirs = run(torch.float32, False), run(torch.float32, True)
    for name, got, bn32, ref in zip(('y', 'dx', 'dw', 'db'), ours, theirs, reference):
        scale = ref.abs().max().item()
        err, bn_err = ((got - ref).abs().max().item() / scale,
                       (bn32 - ref).abs().max().item() / scale)
        assert err <= 2 * bn_err + 1e-6, (name, err, bn_err)



@pytest.fixture
def emulated_cuda_grad_input():
    with emulated_cuda_kernels() as calls:
        yield calls


@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('channels_last', [False, True], ids=['contiguous', 'channels_last'])
def test_cuda_grad_input_branch_passes_the_kernel_what_it_expects(emulated_cuda_grad_input,
                                                                  affine, channels_last):
    """The CUDA backward's arguments (global sums, sum(dy * (x - mean)), int32 count)
    give BN's gradients through the kernel's documented formula, in float64."""
    x = torch.randn(5, C, 3, 4, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    psbn, bn = affine_pair()
    w, b = (psbn.weight, psbn.bias) if affine else (None, None)
    if not affine:
        bn = nn.BatchNorm2d(C, affine=False).double()
    dy = torch.randn_like(x)
    y, y2 = global_bn(x, w, b), bn(x2)
    y.backward(dy), y2.backward(dy)
    assert len(emulated_cuda_grad_input) == 1
    torch.testing.assert_close(y, y2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-12, rtol=1e-12)
    if affine:
        torch.testing.assert_close(psbn.weight.grad, bn.weight.grad)
        torch.testing.assert_close(psbn.bias.grad, bn.bias.grad)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_cuda_global_path_equals_bn(dtype):
    """On CUDA, the backward's one-pass kernel: BN's output and gradients."""
    psbn, bn = (m.cuda() for m in affine_pair(torch.float32))
    x = (torch.randn(4, C, 8, 8, device='cuda') * 2 + 3).to(dtype).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn_like(x)
    y, y2 = global_bn(x, psbn.weight, psbn.bias), bn(x2)  # fp16 input, fp32 affine
    y.backward(dy), y2.backward(dy)
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float16 else {}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(psbn.weight.grad, bn.weight.grad, **tol)

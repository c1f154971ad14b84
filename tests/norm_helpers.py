"""Shared test helpers: random BN states, stand-ins for the MABN/ConvWC protocols, the
CUDA-only SyncBN kernel PortableSyncBN calls, emulated on the CPU, and PortableSyncBN's
two CPU implementations."""
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet_bnplug.layers import portable_sync_bn
from mmdet_bnplug.utils.bn_like import bn_like_layers

# a BN-like layer's statistics buffers (state-dict key suffixes)
STATISTICS = ('running_mean', 'running_var', 'num_batches_tracked')


def randomise_norms(model, seed=0):
    """Non-trivial statistics and affine for every BN-like layer below ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bn_like_layers(model):
            c = layer.num_features
            mean = torch.randn(c, generator=g) * 0.2
            if not hasattr(layer, 'eval_scale_shift'):  # MABN keeps running_mean at 0
                layer.running_mean.copy_(mean)
            layer.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if getattr(layer, 'weight', None) is not None:
                layer.weight.copy_(torch.rand(c, generator=g) + 0.5)
            if getattr(layer, 'bias', None) is not None:
                layer.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def max_rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class StandInMABN(_BatchNorm):
    """Follows MABN's protocol only: eval map ``w * x / sqrt(running_var + eps) + b``."""

    def eval_scale_shift(self):
        scale = self.weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
        return scale, self.bias.float()

    def forward(self, x):
        scale, shift = self.eval_scale_shift()
        shape = (1, -1) + (1, ) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)

    @classmethod
    def from_batchnorm(cls, bn, **kwargs):
        layer = cls(bn.num_features, eps=bn.eps, **kwargs)
        with torch.no_grad():
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            layer.weight.copy_(bn.weight)
            layer.bias.copy_(bn.bias - bn.running_mean * scale)
            layer.running_var.copy_(bn.running_var)
            layer.num_batches_tracked.copy_(bn.num_batches_tracked)
        return layer

    def batchnorm_state(self):
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state['running_mean'] = torch.zeros_like(state['running_var'])
        return state


class StandInConvWC(nn.Conv2d):
    """Follows ConvWC's protocol only: convolves with the kernel centred per filter."""

    @property
    def centred_weight(self):
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x):
        return F.conv2d(x, self.centred_weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


def _backward_elemt_reference(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """What torch's CUDA ``batch_norm_backward_elemt`` computes (its SyncBN's input
    gradient), in float64: ``count`` holds int32 per-rank counts, summed."""
    assert count.dtype == torch.int32, count.dtype
    n = count.double().sum()
    view = (1, -1) + (1, ) * (x.dim() - 2)
    mu, inv = mean.double().view(view), invstd.double().view(view)
    w = 1.0 if weight is None else weight.double().view(view)
    dx = (dy.double() - sum_dy.double().view(view) / n
          - (x.double() - mu) * inv**2 * sum_dy_xmu.double().view(view) / n) * inv * w
    return dx.to(dy.dtype)


@contextmanager
def emulated_cuda_kernels():
    """PortableSyncBN's CUDA branch run on the CPU: ``_fused_grad_input`` forced on,
    ``aten::batch_norm_backward_elemt`` given a CPU kernel (the float64 reference above).
    Yields the list of the kernel's calls."""
    calls = []

    def kernel(*args):
        calls.append(args)
        return _backward_elemt_reference(*args)

    lib = torch.library.Library('aten', 'IMPL')
    lib.impl('batch_norm_backward_elemt', kernel, 'CPU')
    try:
        with mock.patch.object(portable_sync_bn, '_fused_grad_input', lambda x: True):
            yield calls
    finally:
        lib._destroy()


# PortableSyncBN on the CPU: the compiled kernels (ops/csrc/sync_bn_cpu.cpp) and the
# PyTorch implementation that every other device, torch.compile and builds without the
# extension use
SYNC_BN_PATHS = ('compiled', 'pytorch')


@contextmanager
def sync_bn_path(name):
    """Runs PortableSyncBN's CPU ``name`` path inside (one of ``SYNC_BN_PATHS``)."""
    assert portable_sync_bn.cpu_kernels is not None, \
        "PortableSyncBN's compiled CPU kernels are not built "\
        '(pip install --no-build-isolation -e .)'
    if name == 'pytorch':
        with mock.patch.object(portable_sync_bn, 'cpu_kernels', None):
            yield
    else:
        assert name == 'compiled', name
        yield

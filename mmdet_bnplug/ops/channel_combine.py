"""``channel_combine``: a per-channel affine combination of two tensors, as a
``torch.library`` op in the ``mmdet_bnplug`` namespace::

    channel_combine(Tensor dy, Tensor x, Tensor a, Tensor b, Tensor c) -> Tensor

returns ``a[c] * dy + b[c] * x + c[c]`` for ``dy``, ``x`` of one shape ``(N, C, *)`` and
dtype, and ``a``, ``b``, ``c`` of shape ``(C,)`` and one dtype (``x``'s, or the
statistics dtype, float32 for a half ``x``); the result has ``x``'s dtype and memory
format. It is the input gradient of a norm layer's backward (PortableSyncBN's
``_GlobalBatchNorm``, MABN's ``mabn_train_backward``), which ATen computes in two passes
over memory (BN's eval kernel for ``b * x + c``, then ``addcmul_``).

Implementations: on CPU the C++ kernel of ``csrc/channel_combine_cpu.cpp`` (in the
extension ``mmdet_bnplug.ops._mabn_cpu``, registered for the CPU key when built), one
pass for contiguous fp32/fp64 input, those two ATen passes otherwise; on every other
device, and on CPU without the build, the PyTorch implementation below
(CompositeExplicitAutograd, the two passes). No autograd formula: the op serves inside
backward passes (grad mode off). A fake implementation describes the output for
torch.compile and torch.export.
"""
import warnings

import torch

from ..layers._utils import cast, channel_view, stat_dtype

NAMESPACE = 'mmdet_bnplug'
NAME = 'channel_combine'
SCHEMA = '(Tensor dy, Tensor x, Tensor a, Tensor b, Tensor c) -> Tensor'
_lib = torch.library.Library(NAMESPACE, 'FRAGMENT')
_lib.define(NAME + SCHEMA)


def _check(dy, x, a, b, c):
    """The C++ kernel's argument checks, with its messages."""
    op = NAME
    if x.dim() < 2:
        raise RuntimeError(f'{op}: x must have shape (N, C, *), got {list(x.shape)}')
    if not x.is_floating_point():
        raise RuntimeError(f'{op}: x must be floating point, got {x.dtype}')
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise RuntimeError(f"{op}: dy must be a tensor of x's shape, dtype and device "
                           f'({list(x.shape)}, {x.dtype}, {x.device}), got '
                           f'{list(dy.shape)}, {dy.dtype} on {dy.device}')
    stats = stat_dtype(x.dtype)
    if a.dtype not in (x.dtype, stats):
        raise RuntimeError(f"{op}: a must have x's dtype or the statistics dtype {stats}, "
                           f'got {a.dtype}')
    for name, t in (('a', a), ('b', b), ('c', c)):
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} must be on x's device {x.device}, got one on "
                               f'{t.device}')
        if t.shape != (x.shape[1], ):
            raise RuntimeError(f'{op}: {name} must have shape ({x.shape[1]},) (x\'s '
                               f'channels), got {list(t.shape)}')
        if t.dtype != a.dtype:
            raise RuntimeError(f"{op}: {name} must have a's dtype {a.dtype}, got {t.dtype}")


def channel_combine_pytorch(dy, x, a, b, c):
    """``channel_combine`` in PyTorch, any device: ``b * x + c`` by BN's eval kernel
    (mean 0, variance 1, eps 0; fp32 coefficients with half ``x``), then ``addcmul_``."""
    _check(dy, x, a, b, c)
    if x.numel() == 0:  # BN's kernels refuse empty input
        return torch.empty_like(x)
    out = torch.batch_norm(x, b, c, torch.zeros_like(b), torch.ones_like(b), False, 0.0,
                           0.0, torch.backends.cudnn.enabled)
    return out.addcmul_(dy, channel_view(cast(a, out.dtype), x.dim()))


_lib.impl(NAME, channel_combine_pytorch, 'CompositeExplicitAutograd')


@torch.library.register_fake(f'{NAMESPACE}::{NAME}', lib=_lib)
def _channel_combine_fake(dy, x, a, b, c):
    _check(dy, x, a, b, c)
    return torch.empty_like(x)


try:  # importing registers the C++ kernel for CPU (setup.py builds it)
    from . import _mabn_cpu as _kernels
except ImportError:
    _kernels = None
if _kernels is not None and NAME not in getattr(_kernels, 'REGISTERED', ()):
    warnings.warn(f'{NAME}: mmdet_bnplug.ops._mabn_cpu is a stale build without its CPU '
                  'kernel (the PyTorch implementation serves); rebuild it: pip install '
                  '--no-build-isolation -e <checkout>')
#: the C++ kernel is registered for CPU
cpu_kernel = _kernels is not None and NAME in getattr(_kernels, 'REGISTERED', ())

channel_combine = torch.ops.mmdet_bnplug.channel_combine.default

"""``channel_combine`` (mmdet_bnplug/ops/channel_combine.py): ``a * dy + b * x + c`` per
channel, against a float64 computation on both CPU implementations (the C++ kernel of
csrc/channel_combine_cpu.cpp, its one pass and its ATen fallback, and the PyTorch
implementation), described correctly (``torch.library.opcheck``), its arguments checked."""
import pytest
import torch

import mmdet_bnplug  # noqa: F401  (registers the ops)
from mmdet_bnplug.ops import channel_combine as cc_ops
from mmdet_bnplug.testing.threads import torch_threads

IMPLS = {'compiled': cc_ops.channel_combine, 'pytorch': cc_ops.channel_combine_pytorch}


@pytest.fixture(params=list(IMPLS))
def impl(request):
    """Each CPU implementation: the op (the C++ kernel, which must be built) and the
    PyTorch implementation (that of every other device) called directly."""
    if request.param == 'compiled' and not cc_ops.cpu_kernel:
        pytest.fail('the compiled CPU kernels are not built (pip install '
                    '--no-build-isolation -e .)')
    return IMPLS[request.param]


def _inputs(shape, dtype, coeff_dtype=None, memory_format=torch.contiguous_format, seed=0):
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    # distinct per channel: a wrong channel index shows
    a, b, c = (torch.randn(channels, generator=gen, dtype=torch.float64) for _ in range(3))
    x, dy = (t.to(dtype).contiguous(memory_format=memory_format) for t in (x, dy))
    coeff_dtype = coeff_dtype or dtype
    return dy, x, a.to(coeff_dtype), b.to(coeff_dtype), c.to(coeff_dtype)


def _reference(dy, x, a, b, c):
    """float64: a * dy + b * x + c, broadcast over dim 1."""
    view = (1, -1) + (1, ) * (x.dim() - 2)
    a, b, c = (t.double().view(view) for t in (a, b, c))
    return a * dy.double() + b * x.double() + c


def _check_against_reference(out, dy, x, a, b, c):
    assert out.dtype == x.dtype and out.shape == x.shape
    assert out.stride() == x.stride()  # x's memory format
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2,
           torch.float16: 1e-2}[x.dtype]
    torch.testing.assert_close(out.double(), _reference(dy, x, a, b, c), rtol=tol, atol=tol)


SHAPES = {
    '2d': (37, 19),  # (N, C): the coefficients vary along a row
    '4d': (2, 3, 4, 5),
    '5d': (2, 3, 2, 3, 4),
    'tiny_map': (2, 256, 7, 11),  # FPN P7: one task
    'one_pixel': (3, 5, 1, 1),
}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', list(SHAPES.values()), ids=list(SHAPES))
def test_equals_float64_reference(impl, dtype, shape):
    with torch_threads(1):
        args = _inputs(shape, dtype)
        _check_against_reference(impl(*args), *args)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('shape', [(4, 32, 64, 64), (5000, 64)], ids=['4d', '2d'])
def test_large_map_on_several_threads(impl, dtype, shape):
    """Large enough for several parallel tasks: every row written, each once."""
    with torch_threads(2):
        args = _inputs(shape, dtype, seed=1)
        _check_against_reference(impl(*args), *args)


@pytest.mark.parametrize('memory_format,shape', [(torch.channels_last, (2, 3, 4, 5)),
                                                 (torch.channels_last_3d, (2, 3, 2, 3, 4))],
                         ids=['channels_last', 'channels_last_3d'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_channels_last_keeps_its_format(impl, dtype, memory_format, shape):
    """The fallback (ATen's two passes), output in x's memory format."""
    args = _inputs(shape, dtype, memory_format=memory_format)
    out = impl(*args)
    assert out.is_contiguous(memory_format=memory_format)
    _check_against_reference(out, *args)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_half_input_with_float32_coefficients(impl, dtype, memory_format):
    args = _inputs((2, 3, 4, 5), dtype, torch.float32, memory_format)
    _check_against_reference(impl(*args), *args)


def test_other_strides_and_mixed_layouts(impl):
    """Non-contiguous x, dy of another layout than x, coefficients that are strided
    views: the fallback, still a * dy + b * x + c in x's layout."""
    dy, x, a, b, c = _inputs((2, 3, 4, 6), torch.float32)
    sliced = x[..., ::2]
    args = (dy[..., ::2], sliced, a, b, c)
    out = impl(*args)
    assert out.shape == sliced.shape
    torch.testing.assert_close(out.double(), _reference(*args), rtol=1e-5, atol=1e-5)
    mixed = (dy.contiguous(memory_format=torch.channels_last), x, a, b, c)
    out = impl(*mixed)
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), _reference(*mixed), rtol=1e-5, atol=1e-5)
    coeffs = torch.stack([a, b, c], 1).t()  # rows of a transposed tensor: strided vectors
    assert coeffs[0].stride() == (3, )
    strided = (dy, x, coeffs[0], coeffs[1], coeffs[2])
    _check_against_reference(impl(*strided), *strided)


def test_empty_input(impl):
    dy, x, a, b, c = _inputs((0, 3, 4, 4), torch.float32)
    assert impl(dy, x, a, b, c).shape == (0, 3, 4, 4)


def test_registered_with_its_schema_and_the_cpu_kernel():
    op = torch.ops.mmdet_bnplug.channel_combine.default
    assert isinstance(op, torch._ops.OpOverload)
    assert str(op._schema) == ('mmdet_bnplug::channel_combine(Tensor dy, Tensor x, Tensor a, '
                               'Tensor b, Tensor c) -> Tensor')
    assert not any(a.alias_info is not None for a in op._schema.arguments)
    assert cc_ops.cpu_kernel, 'the compiled CPU kernels are not built'
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), 'CPU')


@pytest.mark.parametrize('case', ['fp32', 'fp64', '2d', 'channels_last', 'bf16'])
def test_opcheck(case):
    args = {'fp32': lambda: _inputs((2, 3, 4, 5), torch.float32),
            'fp64': lambda: _inputs((2, 3, 2, 3, 4), torch.float64),
            '2d': lambda: _inputs((6, 4), torch.float32),
            'channels_last': lambda: _inputs((2, 3, 4, 5), torch.float32,
                                             memory_format=torch.channels_last),
            'bf16': lambda: _inputs((2, 3, 4, 5), torch.bfloat16, torch.float32)}[case]()
    torch.library.opcheck(torch.ops.mmdet_bnplug.channel_combine.default, args)


def test_fake_tensors_give_the_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = _inputs((2, 3, 4, 5), torch.bfloat16, torch.float32, torch.channels_last)
    with FakeTensorMode() as mode:
        dy, x, a, b, c = (mode.from_tensor(t) for t in real)
        out = cc_ops.channel_combine(dy, x, a, b, c)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        assert out.is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match=r'channel_combine: b must have shape \(3,\)'):
            cc_ops.channel_combine(dy, x, a, torch.ones(4), c)


@pytest.mark.parametrize('where', ['compiled', 'pytorch', 'fake'])
def test_arguments_are_checked_with_clear_messages(where):
    """Shapes, dtypes and devices, in the C++ kernel, the PyTorch implementation and the
    fake implementation alike, messages naming the op and the argument."""
    if where == 'compiled' and not cc_ops.cpu_kernel:
        pytest.fail('the compiled CPU kernels are not built')
    call = {'compiled': cc_ops.channel_combine, 'pytorch': cc_ops.channel_combine_pytorch,
            'fake': cc_ops._channel_combine_fake}[where]
    dy, x, a, b, c = _inputs((2, 3, 4, 5), torch.float32)
    for name, bad in (('a', (torch.ones(4), b, c)), ('b', (a, torch.ones(3, 1), c)),
                      ('c', (a, b, torch.ones(()))), ('c', (a, b, torch.ones(2)))):
        with pytest.raises(RuntimeError,
                           match=rf"channel_combine: {name} must have shape \(3,\) \(x's "
                           'channels'):
            call(dy, x, *bad)
    with pytest.raises(RuntimeError, match="channel_combine: dy must be a .*tensor of x's "
                                           'shape'):
        call(dy[:1], x, a, b, c)
    with pytest.raises(RuntimeError, match="channel_combine: dy must be a .*tensor of x's "
                                           'shape'):
        call(dy.double(), x, a, b, c)
    with pytest.raises(RuntimeError, match="channel_combine: a must have x's dtype or the "
                                           'statistics dtype'):
        call(dy, x, a.double(), b.double(), c.double())
    with pytest.raises(RuntimeError, match="channel_combine: c must have a's dtype"):
        call(dy, x, a, b, c.double())
    with pytest.raises(RuntimeError, match=r'channel_combine: x must have shape \(N, C, \*\)'):
        call(dy[0, 0, 0], x[0, 0, 0], a, b, c)
    with pytest.raises(RuntimeError, match='channel_combine: x must be floating point'):
        call(dy.long(), x.long(), a, b, c)


WITHOUT_BUILD = r'''
import sys
sys.modules['mmdet_bnplug.ops._mabn_cpu'] = None  # as if the extension were not built
import torch
import mmdet_bnplug
from mmdet_bnplug.layers.portable_sync_bn import _GlobalBatchNorm, global_batch_stats
from mmdet_bnplug.ops import channel_combine as cc_ops
op = torch.ops.mmdet_bnplug.channel_combine.default
assert not cc_ops.cpu_kernel
assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), 'CPU')
x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
dy = torch.randn_like(x)
a, b, c = torch.randn(3, 3, dtype=torch.float64)
v = (1, 3, 1, 1)
torch.testing.assert_close(op(dy, x, a, b, c), a.view(v) * dy + b.view(v) * x + c.view(v))
torch.library.opcheck(op, (dy, x, a, b, c))
xg = x.clone().requires_grad_()
mean, var, count = global_batch_stats(xg, None)
invstd = torch.rsqrt(var + 1e-5)
_GlobalBatchNorm.apply(xg, None, None, mean, var, invstd, count, None, 1e-5).backward(dy)
want = x.clone().requires_grad_()
torch.nn.functional.batch_norm(want, None, None, training=True, eps=1e-5).backward(dy)
torch.testing.assert_close(xg.grad, want.grad)
print('ok')
'''


def test_without_the_build_the_pytorch_implementation_serves_portable_sync_bn():
    """Without the extension the op is still registered (the PyTorch implementation for
    CPU too), and PortableSyncBN's global path uses it (a fresh process: the kernels
    register at import)."""
    import subprocess
    import sys

    from conftest import REPO
    result = subprocess.run([sys.executable, '-c', WITHOUT_BUILD], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-3000:]

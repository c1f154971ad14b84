"""PortableSyncBN's compiled CPU kernels (ops/csrc/sync_bn_cpu.cpp) against its PyTorch
implementation and a float64 computation: this rank's row, the group's combination and
running update, the input gradient; layouts, dtypes, edge cases, argument errors. The
layer on 1 and 2 processes is tested on both paths in tests/layers."""
from unittest import mock

import pytest
import torch
from torch import nn

from mmdet_bnplug.layers import portable_sync_bn as psbn

C = 5


@pytest.fixture(scope='module')
def kernels():
    if psbn.cpu_kernels is None:
        pytest.fail("PortableSyncBN's compiled CPU kernels are not built "
                    '(pip install --no-build-isolation -e .)')
    return psbn.cpu_kernels


def _pytorch_row(x):
    with mock.patch.object(psbn, 'cpu_kernels', None):
        return psbn._local_row(x)


def _layout(x, channels_last):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_local_stats_is_count_mean_m2(kernels, dtype, channels_last):
    x = _layout((torch.randn(3, C, 4, 6, dtype=torch.float64) * 2 + 7).to(dtype), channels_last)
    row = kernels.local_stats(x)
    x64 = x.double()
    mean = x64.mean((0, 2, 3))
    m2 = ((x64 - mean.view(1, -1, 1, 1))**2).sum((0, 2, 3))
    assert row.shape == (1, 2 * C + 1) and row.dtype == torch.promote_types(dtype, torch.float32)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(row[0].double(), torch.cat([torch.tensor([72.0]), mean, m2]),
                               **tol)
    torch.testing.assert_close(row, _pytorch_row(x), **tol)


@pytest.mark.parametrize('channels_last', [False, True])
def test_local_stats_float32_large_mean_against_float64(kernels, channels_last):
    """mean/std = 1e4 in float32, planes longer than one accumulation block and more rows
    than one channels-last part: mean and M2 as a float64 computation of the same values."""
    g = torch.Generator().manual_seed(3)
    x = _layout((torch.randn(3, C, 70, 90, generator=g, dtype=torch.float64) + 1e4).float(),
                channels_last)
    row = kernels.local_stats(x)[0].double()
    var, mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    # the mean within half a float32 ulp at 1e4
    torch.testing.assert_close(row[1:C + 1], mean, rtol=0, atol=1.001 * 2**-11)
    torch.testing.assert_close(row[C + 1:], var * row[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize('channels_last', [False, True])
def test_local_stats_do_not_depend_on_the_thread_count(kernels, channels_last):
    x = _layout(torch.randn(4, C, 60, 70), channels_last)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.local_stats(x)
        torch.set_num_threads(2)
        two = kernels.local_stats(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_local_stats_of_an_empty_batch_is_zeros(kernels):
    row = kernels.local_stats(torch.empty(0, C, 3, 3))
    assert torch.equal(row, torch.zeros(1, 2 * C + 1))


def _gathered(counts, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in counts:
        x = torch.randn(n, C, 3, generator=g, dtype=torch.float64) * 3 + 100
        rows.append(_pytorch_row(x) if n else torch.zeros(1, 2 * C + 1, dtype=torch.float64))
    return torch.cat(rows).to(dtype)


def _python_update(gathered, momentum, rm, rv, tracked):
    """The layer's PyTorch path: _combine, then _update_running_stats."""
    layer = psbn.PortableSyncBN(C, momentum=momentum).to(gathered.dtype)
    layer.running_mean.copy_(rm), layer.running_var.copy_(rv)
    layer.num_batches_tracked.fill_(tracked)
    mean, var, count = psbn._combine(gathered)
    layer._update_running_stats(mean, var, count)
    return (mean, var, torch.rsqrt(var + layer.eps), count), layer


@pytest.mark.parametrize('momentum', [0.3, None])
@pytest.mark.parametrize('counts', [(12, 3), (0, 9), (4, 0, 7, 1)])
def test_combine_and_running_update_equal_the_pytorch_path(kernels, counts, momentum):
    gathered = _gathered(counts)
    rm, rv = torch.linspace(-1, 1, C, dtype=torch.float64), torch.linspace(0.5, 2, C,
                                                                           dtype=torch.float64)
    want, layer = _python_update(gathered, momentum, rm, rv, 4)
    running = rm.clone(), rv.clone(), torch.tensor(4)
    versions = [t._version for t in running]
    *got, total = kernels.combine(gathered, 1e-5, *running, momentum)
    assert total == sum(counts) * 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(running, (layer.running_mean, layer.running_var, layer.num_batches_tracked)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert running[2] == 5
    assert all(t._version > v for t, v in zip(running, versions))  # autograd sees the writes


def test_combine_without_running_statistics_writes_nothing(kernels):
    gathered = _gathered((4, 5))
    mean, var, invstd, count, total = kernels.combine(gathered, 1e-5, None, None, None, 0.1)
    want = psbn._combine(gathered)
    torch.testing.assert_close(mean, want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, want[1], rtol=1e-12, atol=1e-12)
    assert count.item() == total == 27


@pytest.mark.parametrize('case', ['one_value', 'empty', 'non_finite'])
def test_combine_moves_nothing_without_a_valid_finite_update(kernels, case):
    gathered = {'one_value': torch.cat([torch.tensor([[1.0]]), torch.rand(1, 2 * C)], 1),
                'empty': torch.zeros(2, 2 * C + 1),
                'non_finite': _gathered((3, 3), torch.float32)}[case]
    if case == 'non_finite':
        gathered[1, 2] = float('inf')
    running = torch.zeros(C), torch.ones(C), torch.tensor(7)
    *_, total = kernels.combine(gathered.float(), 1e-5, *running, 0.1)
    assert total == {'one_value': 1, 'empty': 0, 'non_finite': 18}[case]
    assert torch.equal(running[0], torch.zeros(C)) and torch.equal(running[1], torch.ones(C))
    assert running[2] == 7


def test_combine_float32_large_mean_keeps_each_rank_precision(kernels):
    """8 ranks of detection-sized counts, float32 means near 1e4: the combined mean is a
    float64 combination of the same rows rounded to float32 (summing count * mean in
    float32 is an ulp off on some channels), the variance to float32 precision; both
    paths."""
    g, channels = torch.Generator().manual_seed(0), 64
    counts = torch.randint(100000, 1000000, (8, 1), generator=g).float()
    means = (1e4 + torch.rand(8, channels, generator=g, dtype=torch.float64) * 2 - 1).float()
    rows = torch.cat([counts, means, torch.rand(8, channels, generator=g) * counts], 1)
    r = rows.double()
    n, m, m2 = r[:, :1], r[:, 1:channels + 1], r[:, channels + 1:]
    mean = (n * m).sum(0) / n.sum()
    var = (m2 + n * (m - mean)**2).sum(0) / n.sum()
    for got_mean, got_var in (kernels.combine(rows, 1e-5, None, None, None, 0.1)[:2],
                              psbn._combine(rows)[:2]):
        assert torch.equal(got_mean, mean.float())
        torch.testing.assert_close(got_var.double(), var, rtol=1e-6, atol=0)


def test_combine_updates_half_buffers_through_float32(kernels):
    gathered = _gathered((6, 6), torch.float32)
    running = torch.zeros(C, dtype=torch.half), torch.ones(C, dtype=torch.half), torch.tensor(0)
    mean, var, *_ = kernels.combine(gathered, 1e-5, *running, 0.5)
    assert running[0].dtype == torch.half
    torch.testing.assert_close(running[0].float(), 0.5 * mean, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(running[1].float(), 0.5 + 0.5 * var * 36 / 35, rtol=1e-3,
                               atol=1e-2)


def _bn_grad_input(x, dy, weight):
    """nn.BatchNorm2d's input gradient, float64: this process is the group."""
    bn = nn.BatchNorm2d(C, affine=weight is not None).double()
    if weight is not None:
        with torch.no_grad():
            bn.weight.copy_(weight)
    x = x.detach().double().requires_grad_()
    bn(x).backward(dy.double())
    return x.grad


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _input(dtype, channels_last):
    """A generator and an input (3, C, 4, 5) of mean 3 and spread 2 in ``dtype``."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, C, 4, 5, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    return g, _layout(x, channels_last)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_grad_input_is_bn_input_gradient(kernels, dtype, affine, channels_last):
    g, x = _input(dtype, channels_last)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.linspace(0.5, 1.5, C, dtype=x.dtype) if affine else None
    sd = torch.promote_types(dtype, torch.float32)
    mean, var, count = psbn.global_batch_stats(x, None)
    invstd = torch.rsqrt(var + 1e-5)
    _, s_dy_xhat, s_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, None, None, mean, invstd, True, 0.0, [False, True, True])
    dx = kernels.grad_input(dy, x, mean, invstd, weight, torch.cat([s_dy, s_dy_xhat]).to(sd),
                            count)
    assert dx.dtype == dtype and dx.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = _bn_grad_input(x, dy, weight.double() if affine else None)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(dx.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_normalize_is_bn_output_with_given_statistics(kernels, dtype, affine, channels_last):
    g, x = _input(dtype, channels_last)
    sd = torch.promote_types(dtype, torch.float32)
    mean, var = torch.randn(C, dtype=sd) + 3, torch.rand(C, dtype=sd) + 1
    invstd = torch.rsqrt(var + 1e-5)
    weight, bias = (torch.rand(C, dtype=sd) + 0.5, torch.randn(C, dtype=sd)) if affine \
        else (None, None)
    y = kernels.normalize(x, mean, invstd, weight, bias)
    v = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    want = (x.double() - v(mean)) * v(invstd)
    if affine:
        want = want * v(weight) + v(bias)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last
                                                if channels_last else torch.contiguous_format)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_normalize_float32_large_mean_against_float64(kernels):
    """(x - mean) first: with x near 1e4 and spread 1, the output is as precise as float32
    values of order 1 allow (torch's eval kernel, x * alpha + beta, is not)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, C, 8, 8, generator=g, dtype=torch.float64) + 1e4).float()
    mean = x.double().mean((0, 2, 3)).float()
    invstd = torch.ones(C)
    y = kernels.normalize(x, mean, invstd, None, None)
    want = x.double() - mean.double().view(1, -1, 1, 1)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-6)


def test_grad_input_reads_dy_in_another_layout(kernels):
    x = torch.randn(2, C, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(2, C, 3, 4, dtype=torch.float64)  # contiguous
    mean, var, count = psbn.global_batch_stats(x, None)
    invstd = torch.rsqrt(var + 1e-5)
    _, s_dy_xhat, s_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, None, None, mean, invstd, True, 0.0, [False, True, True])
    dx = kernels.grad_input(dy, x, mean, invstd, None, torch.cat([s_dy, s_dy_xhat]), count)
    torch.testing.assert_close(dx, _bn_grad_input(x, dy, None), rtol=1e-12, atol=1e-12)


def test_kernels_check_their_arguments(kernels):
    x = torch.randn(2, C, 3)
    with pytest.raises(RuntimeError, match='local_stats: x must be floating point'):
        kernels.local_stats(x.long())
    with pytest.raises(RuntimeError, match=r'combine: gathered must be a contiguous CPU '
                                           r'tensor \(ranks, 2C \+ 1\)'):
        kernels.combine(torch.zeros(2, 2 * C), 1e-5, None, None, None, 0.1)
    with pytest.raises(RuntimeError, match='running_mean, running_var and num_batches_tracked '
                                           'go together'):
        kernels.combine(torch.zeros(2, 2 * C + 1), 1e-5, torch.zeros(C), None, None, 0.1)
    with pytest.raises(RuntimeError, match='combine: running_var must have shape'):
        kernels.combine(_gathered((3, 3), torch.float32), 1e-5, torch.zeros(C),
                        torch.ones(C + 1), torch.tensor(0), 0.1)
    stats = torch.zeros(C)
    with pytest.raises(RuntimeError, match="grad_input: dy must be a CPU tensor of x's shape"):
        kernels.grad_input(x[:1], x, stats, stats, None, torch.zeros(2 * C), torch.tensor(6.))
    with pytest.raises(RuntimeError, match='grad_input: sums must have shape'):
        kernels.grad_input(x, x, stats, stats, None, torch.zeros(C), torch.tensor(6.))


def test_the_layer_uses_the_kernels_on_cpu(kernels, monkeypatch):
    """The compiled path is the one the CPU tests call 'compiled': every kernel is called
    by a synchronised training step (the group here is this process)."""
    calls = []
    for name in ('local_stats', 'combine', 'normalize', 'grad_input'):
        fn = getattr(kernels, name)
        monkeypatch.setattr(psbn.cpu_kernels, name,
                            lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a),
                            raising=True)
    layer = psbn.PortableSyncBN(C)
    monkeypatch.setattr(layer, '_sync_group', lambda: 'group')
    monkeypatch.setattr(psbn, '_gather_rows', lambda local, group, *what: local)  # one rank
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    layer(x).sum().backward()
    assert calls == ['local_stats', 'combine', 'normalize', 'grad_input']

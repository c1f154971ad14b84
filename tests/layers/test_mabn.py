"""MABN against an independent float64 (numpy) implementation of docs/mabn_spec.md,
on both CPU training paths (compiled and PyTorch: the ``mabn_path`` fixture) and on CUDA
(the PyTorch implementation, by dispatch)."""
import io
import re

import numpy as np
import pytest
import torch

from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.ops import mabn as mabn_ops
from mmdet_bnplug.testing.mabn_reference import SpecMABN

pytestmark = pytest.mark.usefixtures('one_thread', 'mabn_path')  # tiny tensors


HPARAMS = dict(buffer_size=4, warmup_iters=30, renorm_iters=80, r_max=1.5,
               momentum=0.1, eps=1e-5)
# phases (batch statistics?, renorm active?) visited with HPARAMS: warm-up, SMA, renorm
PHASES = {(True, False), (False, False), (False, True)}
# buffer_size > warmup_iters: batch statistics until t > buffer_size, renorm before SMA
HPARAMS_LONG_BUFFER = dict(buffer_size=9, warmup_iters=3, renorm_iters=0, r_max=1.5,
                           momentum=0.05, eps=1e-3)
PHASES_LONG_BUFFER = {(True, False), (True, True), (False, True)}


# (N, C, *) shapes cycled through: ranks 2 to 5, batch 1 with 1x1 spatial
SHAPES = [(2, 3, 4, 5), (1, 3, 1, 1), (3, 3, 7), (5, 3), (2, 3, 2, 3, 2)]


def _run_against_spec(dtype, iters, tol, seed=0, hparams=HPARAMS, phases_seen=PHASES,
                      device='cpu'):
    rng = np.random.default_rng(seed)
    c = 3
    layer = MABN(c, **hparams).to(device, dtype).train()
    spec = SpecMABN(c, **hparams)
    phases = set()
    for it in range(iters):
        shape = SHAPES[it % len(SHAPES)]
        # the input scale drifts, so r leaves [1/r_max, r_max] and gets clipped
        scale = np.exp(rng.uniform(-1.5, 1.5)) * (1 + 0.3 * np.arange(c))
        x = rng.standard_normal(shape) * scale.reshape((1, -1) + (1, ) * (len(shape) - 2))
        x += 0.5 * rng.standard_normal()
        dy = rng.standard_normal(shape)
        w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
        layer.weight.grad = layer.bias.grad = None

        xt = torch.tensor(x, dtype=dtype, device=device, requires_grad=True)
        y = layer(xt)
        y.backward(torch.tensor(dy, dtype=dtype, device=device))
        y_ref = spec.forward(x, w, b)
        dx_ref, dw_ref, db_ref = spec.backward(dy)
        t = spec.t
        phases.add((spec.use_batch, t > max(spec.renorm, spec.warmup)))

        def close(name, got, want):
            got = got.detach().double().cpu().numpy()
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol,
                                       err_msg=f'{name} at t={t}')

        close('y', y, y_ref)
        close('dx', xt.grad, dx_ref)
        close('dw', layer.weight.grad, dw_ref)
        close('db', layer.bias.grad, db_ref)
        close('running_var', layer.running_var, spec.running_var)
        close('buffer_x2', layer.buffer_x2, spec.buffer_x2)
        close('buffer_gz', layer.buffer_gz, spec.buffer_gz)
        assert layer.num_batches_tracked.item() == t
    assert phases == phases_seen
    layer.eval()
    x = rng.standard_normal((2, c, 3, 3))
    with torch.no_grad():
        y = layer(torch.tensor(x, dtype=dtype, device=device)).double().cpu().numpy()
    np.testing.assert_allclose(y, spec.eval(x, w, b), rtol=tol, atol=tol)
    assert layer.num_batches_tracked.item() == iters  # eval leaves the state alone


def test_matches_spec_float64_every_step():
    _run_against_spec(torch.float64, iters=1250, tol=1e-9)


def test_matches_spec_buffer_longer_than_warmup():
    _run_against_spec(torch.float64, iters=200, tol=1e-9, seed=2,
                      hparams=HPARAMS_LONG_BUFFER, phases_seen=PHASES_LONG_BUFFER)


def test_matches_spec_float32():
    _run_against_spec(torch.float32, iters=300, tol=2e-4, seed=1)


# CUDA has one implementation of the ops: a single value replaces the module's mabn_path
# fixture (the choice of CPU path)
@pytest.mark.cuda
@pytest.mark.parametrize('mabn_path', ['cuda'])
@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-9), (torch.float32, 2e-4)],
                         ids=['float64', 'float32'])
def test_matches_spec_on_cuda(dtype, tol):
    _run_against_spec(dtype, iters=300, tol=tol, seed=1, device='cuda')


def _kernel(op, key):
    """Where the dispatcher's kernel of ``op`` for dispatch key ``key`` comes from."""
    table = torch._C._dispatch_dump_table(f'{mabn_ops.NAMESPACE}::{op}')
    return re.search(rf'^{key}: registered at (.*)$', table, re.M).group(1)


def test_on_cuda_the_ops_are_the_pytorch_implementation():
    """The C++ build registers kernels for CPU and AutogradCPU only: on CUDA (and every
    other device) the step's ops are ops/mabn.py's PyTorch functions
    (CompositeExplicitAutograd) and the affine op's autograd rule is the Python one."""
    for op in mabn_ops.PYTORCH_IMPLS:
        assert re.fullmatch(r'.*mmdet_bnplug/ops/mabn\.py:\d+ \[default backend kernel\]',
                            _kernel(op, 'CUDA')), op
    assert re.fullmatch(r'.*mmdet_bnplug/ops/mabn\.py:\d+ \[autograd kernel\]',
                        _kernel('mabn_train_affine', 'AutogradCUDA'))


def _layer_in_phase(t, renorm_active, dtype=torch.float64):
    """A float64 layer at counter t (SMA active) with filled forward ring buffer."""
    layer = MABN(2, buffer_size=3, warmup_iters=5, renorm_iters=10, r_max=2.0)
    layer = layer.to(dtype).train()
    with torch.no_grad():
        layer.num_batches_tracked.fill_(t - 1)
        layer.buffer_x2.uniform_(0.5, 2.0)
        # running_var far above E[x^2] ~ 1 puts r at its clip bound 1/r_max, where it
        # is a constant (unclipped, the spec treats r as a stop-gradient constant)
        layer.running_var.fill_(100.0 if renorm_active else 1.0)
    return layer


@pytest.mark.parametrize('t, renorm_active', [(8, False), (20, True)])
def test_gradcheck_with_sma(t, renorm_active):
    """The explicit backward is the true gradient when the other SMA rows are
    constants: zero in the backward ring (non-zero rows there add a dy-independent
    term, by design of the moving-average backward)."""
    layer = _layer_in_phase(t, renorm_active)
    state = {k: v.clone() for k, v in layer.named_buffers()}
    torch.manual_seed(0)
    x = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        fresh = {k: v.clone() for k, v in state.items()}  # each call: the same state
        return torch.func.functional_call(layer, {**fresh, 'weight': w, 'bias': b},
                                          (x, ))

    assert torch.autograd.gradcheck(fn, (x, w, b))


def _train(layer, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
        y = layer(x)
        y.backward(torch.randn(y.shape, generator=gen))
        out.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
        layer.weight.grad = layer.bias.grad = None
        with torch.no_grad():  # a step of plain SGD, so that weights move too
            layer.weight.sub_(0.01 * out[-1][2])
            layer.bias.sub_(0.01 * out[-1][3])
    return out


def test_state_dict_round_trip_continues_identically():
    hp = dict(buffer_size=3, warmup_iters=4, renorm_iters=6, r_max=1.2)
    a = MABN(3, **hp).train()
    _train(a, 9, seed=0)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    assert set(a.state_dict()) == {'weight', 'bias', 'running_mean', 'running_var',
                                   'num_batches_tracked', 'buffer_x2', 'buffer_gz'}
    b = MABN(3, **hp).train()
    blob.seek(0)
    b.load_state_dict(torch.load(blob), strict=True)
    for ra, rb in zip(_train(a, 6, seed=1), _train(b, 6, seed=1)):
        for ta, tb in zip(ra, rb):
            assert torch.equal(ta, tb)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_eval_map_and_scale_shift():
    layer = MABN(4).eval()
    with torch.no_grad():
        layer.running_var.uniform_(0.5, 3.0)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(2, 4, 5, 5)
    scale, shift = layer.eval_scale_shift()
    assert scale.dtype == shift.dtype == torch.float32 and scale.shape == (4, )
    expect = scale.view(1, -1, 1, 1) * x + shift.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expect)
    torch.testing.assert_close(shift, layer.bias.detach())
    torch.testing.assert_close(
        scale, layer.weight.detach() / (layer.running_var + layer.eps).sqrt())

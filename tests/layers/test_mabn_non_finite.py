"""MABN's non-finite guard (an fp16 overflow that GradScaler skips): a step whose
forward statistics or gradient statistics are not finite writes nothing into the
layer's state, so later steps and eval are unaffected; on both CPU training paths
(compiled and PyTorch: the ``mabn_path`` fixture)."""
import numpy as np
import pytest
import torch
from torch import nn

from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.testing.mabn_reference import SpecMABN

pytestmark = pytest.mark.usefixtures('one_thread', 'mabn_path')  # tiny tensors

C = 3
HPARAMS = dict(buffer_size=4, warmup_iters=6, renorm_iters=10, r_max=1.5, momentum=0.1,
               eps=1e-5)
STEPS = 20
W, B = np.array([0.8, 1.2, 1.0]), np.array([0.1, -0.2, 0.3])


def _inputs(step):
    rng = np.random.default_rng(step)
    return rng.standard_normal((2, C, 3, 3)) * 1.5 + 0.3, rng.standard_normal((2, C, 3, 3))


def _layer():
    layer = MABN(C, **HPARAMS).double().train()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
        layer.bias.copy_(torch.from_numpy(B))
    return layer


def _step(layer, x, dy):
    """One training step; returns (y, dx, dw, db) as float64 numpy arrays."""
    layer.weight.grad = layer.bias.grad = None
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.tensor(dy))
    return [t.detach().numpy() for t in (y, xt.grad, layer.weight.grad, layer.bias.grad)]


def _state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _assert_finite(state):
    for key, value in state.items():
        assert torch.isfinite(value.double()).all(), key


@pytest.mark.parametrize('bad_step', [2, 9, 14])  # batch statistics, SMA, SMA + renorm
def test_inf_activation_step_is_as_if_it_never_happened(bad_step):
    """An inf in one input: that step's statistics are skipped (counter, buffer_x2,
    running_var and, through its non-finite gradient, buffer_gz unchanged); every later
    step equals a run without the bad step, exactly."""
    bad, clean = _layer(), _layer()
    for step in range(STEPS):
        x, dy = _inputs(step)
        if step == bad_step:
            before = _state(bad)
            x = x.copy()
            x[1, 2, 1, 1] = np.inf
            _step(bad, x, dy)
            after = _state(bad)
            for key in before:
                assert torch.equal(before[key], after[key]), key
            continue
        got, want = _step(bad, x, dy), _step(clean, x, dy)
        for name, g, w in zip(('y', 'dx', 'dw', 'db'), got, want):
            np.testing.assert_array_equal(g, w, err_msg=f'{name} at step {step}')
        assert _state(bad).keys() == _state(clean).keys()
        for key, value in _state(bad).items():
            assert torch.equal(value, _state(clean)[key]), (key, step)
    _assert_finite(_state(bad))
    assert bad.num_batches_tracked.item() == STEPS - 1
    bad.eval()
    x = torch.tensor(_inputs(99)[0])
    with torch.no_grad():
        assert torch.isfinite(bad(x)).all()


@pytest.mark.parametrize('bad_step', [2, 9, 14])
@pytest.mark.parametrize('bad_value', [np.inf, np.nan])
def test_non_finite_gradient_skips_only_the_gradient_record(bad_step, bad_value):
    """A non-finite gradient (forward finite): the forward statistics count (counter,
    buffer_x2, running_var advance), buffer_gz keeps that row; every step, the bad
    one's forward included, equals the float64 reference with the same guard."""
    layer = _layer()
    spec = SpecMABN(C, **HPARAMS)
    for step in range(STEPS):
        x, dy = _inputs(step)
        if step == bad_step:
            dy = dy.copy()
            dy[0, 1, 2, 0] = bad_value
        gz_before = layer.buffer_gz.clone()
        y, dx, dw, db = _step(layer, x, dy)
        y_ref = spec.forward(x, W, B)
        dx_ref, dw_ref, db_ref = spec.backward(dy)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10, err_msg=f'y at {step}')
        if step == bad_step:
            assert torch.equal(layer.buffer_gz, gz_before)
            assert not np.isfinite(dx).all()  # the step itself: GradScaler skips it
            continue
        for name, g, w in (('dx', dx, dx_ref), ('dw', dw, dw_ref), ('db', db, db_ref)):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10,
                                       err_msg=f'{name} at step {step}')
        for key in ('running_var', 'buffer_x2', 'buffer_gz'):
            np.testing.assert_allclose(getattr(layer, key).numpy(), getattr(spec, key),
                                       rtol=1e-10, atol=1e-10, err_msg=f'{key} at {step}')
        assert layer.num_batches_tracked.item() == spec.t == step + 1
    _assert_finite(_state(layer))


def _grad_scaler_loop(norm, steps=40):
    """Six conv + norm + ReLU blocks trained with fp16 autocast on CPU and dynamic loss
    scaling from 2**30 (the first steps overflow); returns (model, taken), ``taken[i]``
    whether GradScaler took step i."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), norm(), nn.ReLU()]
    for _ in range(5):
        layers += [nn.Conv2d(8, 8, 3, padding=1), norm(), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(8, 1, 1))
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**30, growth_interval=1000)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    taken = []
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8)
        with torch.autocast('cpu', dtype=torch.float16):
            loss = model(x).float().square().mean()
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        taken.append(scaler.get_scale() == scale)
    return model, taken


def test_grad_scaler_loop_that_overflows_at_the_start_trains_on():
    """GradScaler skips the overflowing first steps, then takes every step, and skips
    no more steps with MABN than with BN (whose backward keeps no state). Without the
    guard an overflow's inf row in a ring buffer makes the next steps' gradients
    non-finite too, cascading down the stack (measured: 26 steps skipped against BN's
    15, the scale 2**11 times lower)."""
    model, taken = _grad_scaler_loop(
        lambda: MABN(8, buffer_size=4, warmup_iters=2, renorm_iters=4))
    _, taken_bn = _grad_scaler_loop(lambda: nn.BatchNorm2d(8))
    first = taken.index(True)
    assert first > 0, 'the loop must overflow at the start'
    assert all(taken[first:]), f'steps skipped after the first one taken: {taken}'
    assert first <= taken_bn.index(True) + 1, (taken, taken_bn)
    for layer in model:
        if isinstance(layer, MABN):
            _assert_finite(_state(layer))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()

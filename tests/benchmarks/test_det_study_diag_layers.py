"""The detection study's diagnostic MABN (``benchmarks/det_study/diag_layers.py``) with
every switch on equals the package's MABN, step by step in float64 (outputs, input and
affine gradients, running statistics), through every phase: batch statistics, the moving
averages, then renorm; with a switch off it differs (so the comparison can fail)."""
import pytest
import torch

from benchmarks.det_study.diag_layers import MABNDiag
from mmdet_bnplug.layers.mabn import MABN

ARGS = dict(buffer_size=4, warmup_iters=2, renorm_iters=8, r_max=1.5, momentum=0.1)
STEPS = 14  # phases: batch statistics to 4 (buffer_size), moving averages from 5, renorm from 9


def _train(layer, seed=0):
    """Per step ``(y, dx, dweight, dbias)`` of ``STEPS`` training steps, and the final
    state dict."""
    g = torch.Generator().manual_seed(seed)
    layer.train()
    steps = []
    for _ in range(STEPS):
        x = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) * 2 + 1
             ).requires_grad_()
        dy = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        steps.append((y.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return steps, layer.state_dict()


def _layers(**switches):
    torch.manual_seed(1)
    mabn = MABN(4, **ARGS).double()
    with torch.no_grad():
        mabn.weight.uniform_(0.5, 1.5)
        mabn.bias.uniform_(-0.5, 0.5)
    diag = MABNDiag(4, **ARGS, **switches).double()
    diag.load_state_dict(mabn.state_dict())
    return mabn, diag


def test_every_switch_on_equals_the_package_mabn_at_every_step():
    mabn, diag = _layers()
    (ref_steps, ref_state), (steps, state) = _train(mabn), _train(diag)
    for step, (ref, got) in enumerate(zip(ref_steps, steps)):
        for name, a, b in zip(('y', 'dx', 'dweight', 'dbias'), ref, got):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f'step {step + 1}, {name}: {m}')
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f'{key}: {m}')


@pytest.mark.parametrize('switch', ['fwd_sma', 'bwd_sma', 'renorm'])
def test_a_switch_off_changes_the_training_step(switch):
    mabn, diag = _layers(**{switch: False})
    ref_steps, _ = _train(mabn)
    steps, _ = _train(diag)
    late = [max(float((a - b).abs().max()) for a, b in zip(ref, got))
            for ref, got in zip(ref_steps[-3:], steps[-3:])]
    assert max(late) > 1e-3, (switch, late)

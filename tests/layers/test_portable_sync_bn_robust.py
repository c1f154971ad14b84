"""PortableSyncBN under what users switch on: a non-finite batch (an fp16 overflow that
GradScaler skips) leaves its state untouched, and activation checkpointing advances its
statistics once per iteration; on one process and on 2 gloo processes."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from torch import nn
from torch.utils.checkpoint import checkpoint

import mmdet_bnplug  # noqa: F401
from dist_utils import run_distributed
from mmdet_bnplug.layers import PortableSyncBN
from norm_helpers import SYNC_BN_PATHS, sync_bn_path

C = 3


def _batch(step, rank=0):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, C, 4, 4, generator=g, dtype=torch.float64) * 2 + 1


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _train(layer, steps, bad_step=None, rank=0, momentum_none=False):
    """Forward+backward per step; ``bad_step`` gets an inf in its input."""
    for step in range(steps):
        x = _batch(step, rank)
        if step == bad_step:
            x[0, 1, 0, 0] = float('inf')
        x.requires_grad_()
        layer(x).square().mean().backward()
    return _state(layer)


def _skipped_equals_clean(rank, momentum):
    """State after steps 0..5 with an inf at step 2 == state after the steps without it."""
    bad = _train(PortableSyncBN(C, momentum=momentum).double(), 6, bad_step=2, rank=rank)
    clean = PortableSyncBN(C, momentum=momentum).double()
    for step in (0, 1, 3, 4, 5):
        x = _batch(step, rank).requires_grad_()
        clean(x).square().mean().backward()
    return bad, _state(clean)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.isfinite(a[key].double()).all(), key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.usefixtures('sync_bn_cpu_path')
@pytest.mark.parametrize('momentum', [0.1, None])
def test_non_finite_batch_writes_no_state_one_process(momentum):
    bad, clean = _skipped_equals_clean(0, momentum)
    _assert_same(bad, clean)
    assert bad['num_batches_tracked'] == 5


def _dist_non_finite(rank, world_size):
    result = {}
    for path in SYNC_BN_PATHS:
        with sync_bn_path(path):
            result[path] = _skipped_equals_clean(rank, 0.1)
    return result


def test_non_finite_batch_writes_no_state_two_processes():
    """Only rank 0's batch has the inf; the group's statistics are then non-finite on
    every rank, so both ranks skip the write; on both CPU implementations."""
    for result in run_distributed(_dist_non_finite, 2):
        for bad, clean in result.values():
            _assert_same(bad, clean)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 1).double(), PortableSyncBN(C).double()

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


def _checkpointed_run(rank, mode):
    torch.manual_seed(0)
    block = _Block()
    grads = []
    for step in range(4):
        x = _batch(step, rank).requires_grad_()
        if mode == 'plain':
            y = block(x)
        else:
            y = checkpoint(block, x, use_reentrant=(mode == 'reentrant'))
        y.square().mean().backward()
        grads.append(x.grad)
    return _state(block.bn), grads


@pytest.mark.usefixtures('sync_bn_cpu_path')
@pytest.mark.parametrize('mode', ['reentrant', 'non_reentrant'])
def test_checkpointing_advances_once_one_process(mode):
    state, grads = _checkpointed_run(0, mode)
    ref_state, ref_grads = _checkpointed_run(0, 'plain')
    assert state['num_batches_tracked'] == 4
    _assert_same(state, ref_state)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _dist_checkpointing(rank, world_size):
    result = {}
    for path in SYNC_BN_PATHS:
        with sync_bn_path(path):
            result[path] = {mode: _checkpointed_run(rank, mode)
                            for mode in ('plain', 'reentrant', 'non_reentrant')}
    return result


def test_checkpointing_advances_once_two_processes():
    for result in (r[path] for r in run_distributed(_dist_checkpointing, 2)
                   for path in SYNC_BN_PATHS):
        ref_state, ref_grads = result['plain']
        for mode in ('reentrant', 'non_reentrant'):
            state, grads = result[mode]
            assert state['num_batches_tracked'] == 4
            _assert_same(state, ref_state)
            for got, want in zip(grads, ref_grads):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures('sync_bn_cpu_path')
def test_mmdet_resnet_with_cp_advances_once_per_iteration():
    def run(with_cp):
        torch.manual_seed(0)
        model = ResNet(18, out_indices=(3, ), with_cp=with_cp, norm_eval=False,
                       norm_cfg=dict(type='PortableSyncBN')).double()
        model.train()
        for step in range(3):
            x = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(step))
            model(x.requires_grad_())[0].mean().backward()
        return {n: _state(m) for n, m in model.named_modules()
                if isinstance(m, PortableSyncBN)}

    with_cp, without = run(True), run(False)
    for name, state in with_cp.items():
        assert state['num_batches_tracked'] == 3, name
        for key, value in state.items():
            torch.testing.assert_close(value, without[name][key], rtol=1e-10, atol=1e-12)

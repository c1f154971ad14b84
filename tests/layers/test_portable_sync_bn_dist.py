"""PortableSyncBN on 2 and 4 gloo processes (and on 2 GPUs over nccl, where there are
two) against nn.BatchNorm2d on the concatenated batch.

Two launches in all on the CPU (each costs seconds): the ranks run every case and return
tensors; the references and the comparisons run here, in the test process.
"""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import CollectiveCounter, run_distributed
from mmdet_bnplug.layers.portable_sync_bn import PortableSyncBN, _process_group
from norm_helpers import SYNC_BN_PATHS, emulated_cuda_kernels, sync_bn_path

C, SPATIAL, MOMENTUM, STEPS = 3, (4, 5), 0.3, 2
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
# per-rank batch sizes on 2 ranks: equal, unequal, rank 0 empty
SPLITS = {'equal': (2, 2), 'unequal': (3, 1), 'one_empty': (0, 3)}
SYNC_CASES = [(path, split, dtype) for path in SYNC_BN_PATHS for split in SPLITS
              for dtype in (torch.float64, torch.float32)]
EMULATED_SPLITS = ('unequal', 'one_empty')
LOCAL_SIZES = (2, 3)  # group_size=1
GROUP_SIZES = (2, 1, 0, 3)  # 4 ranks


def batches(sizes, dtype, step):
    """Concatenated input and output gradient of one step (same on every process)."""
    g = torch.Generator().manual_seed(100 * step + 7 * len(sizes) + sum(sizes))
    shape = (sum(sizes), C) + SPATIAL
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def rank_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def init_affine(layer):
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C))
        layer.bias.copy_(torch.linspace(-0.2, 0.3, C))
    return layer


def synchronised_counts(steps, backward=1):
    """Collectives per step (forward, backward) of a fresh synchronised layer: one each way,
    plus the layer's handshake in the first forward."""
    return [(1 + (step == 0), backward) for step in range(steps)]


def run_steps(layer, sizes, dtype, rank, counter, autocast=False, device='cpu'):
    """Forward/backward STEPS times on this rank's slice on ``device`` (the layer's);
    tensors (on the CPU) and collective counts."""
    out = []
    for step in range(STEPS):
        x_all, dy_all = batches(sizes, dtype, step)
        x = rank_slice(x_all, sizes, rank).clone().to(device).requires_grad_()
        layer.zero_grad(set_to_none=True)
        counter.take()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x.to(torch.bfloat16) if autocast else x)
        fwd = counter.take()
        y.backward(rank_slice(dy_all, sizes, rank).to(device, y.dtype))
        out.append(dict(y=y.detach().cpu(), gx=x.grad.cpu(), gw=layer.weight.grad.cpu(),
                        gb=layer.bias.grad.cpu(), fwd=fwd, bwd=counter.take()))
    return dict(steps=out, state={k: v.cpu() for k, v in layer.state_dict().items()})


def two_rank_worker(rank, world_size):
    counter = CollectiveCounter()
    res = {}
    with counter.installed():
        for path, split, dtype in SYNC_CASES:
            layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM).to(dtype))
            with sync_bn_path(path):
                res[path, split, dtype] = run_steps(layer, SPLITS[split], dtype, rank, counter)
        with emulated_cuda_kernels() as calls:  # the CUDA branch of the backward
            for split in EMULATED_SPLITS:
                layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM).double())
                res['emulated_cuda', split] = run_steps(layer, SPLITS[split], torch.float64,
                                                        rank, counter)
            res['emulated_cuda_calls'] = len(calls)
        layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM, group_size=1).double())
        res['local'] = run_steps(layer, LOCAL_SIZES, torch.float64, rank, counter)
        for path in SYNC_BN_PATHS:
            layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM))
            with sync_bn_path(path):
                res['autocast', path] = run_steps(layer, SPLITS['unequal'], torch.float32,
                                                  rank, counter, autocast=True)
        layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM).double())
        run_steps(layer, SPLITS['unequal'], torch.float64, rank, counter)
        res['eval'] = run_steps(layer.eval(), SPLITS['unequal'], torch.float64, rank, counter)
        res['all_empty'] = run_steps(init_affine(PortableSyncBN(C).double()), (0, 0),
                                     torch.float64, rank, counter)
    try:
        PortableSyncBN(C, group_size=3)(torch.randn(2, C, 2))
    except ValueError as err:
        res['bad_group_size'] = str(err)
    res['stall'] = stalled_peer(rank)
    return res


def stalled_peer(rank):
    """Rank 1 never calls the layer: rank 0 must get an error after the timeout."""
    if not hasattr(dist.distributed_c10d, '_set_pg_timeout'):
        return None
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=2))
    if rank == 1:
        time.sleep(6)
        return None
    start = time.monotonic()
    try:
        PortableSyncBN(C)(torch.randn(2, C, 3))
    except RuntimeError as err:
        return dict(error=str(err), seconds=time.monotonic() - start)
    return dict(error=None, seconds=time.monotonic() - start)


@pytest.fixture(scope='module')
def two_ranks():
    return run_distributed(two_rank_worker, world_size=2, timeout=180)


def bn_reference(sizes, dtype, ranks):
    """nn.BatchNorm2d on the concatenation of ``ranks``' batches: per-step tensors, state."""
    bn = init_affine(nn.BatchNorm2d(C, momentum=MOMENTUM).to(dtype))
    out = []
    for step in range(STEPS):
        x_all, dy_all = batches(sizes, dtype, step)
        x, dy = (torch.cat([rank_slice(t, sizes, r) for r in ranks]) for t in (x_all, dy_all))
        x.requires_grad_()
        bn.zero_grad(set_to_none=True)
        y = bn(x)
        y.backward(dy)
        out.append(dict(y=y.detach(), gx=x.grad, gw=bn.weight.grad, gb=bn.bias.grad))
    return out, bn.state_dict()


def assert_matches_bn(results, sizes, dtype, ranks=None):
    """``results[r]`` (r in ``ranks``, default all) against BN on their concatenated batch:
    outputs, input grads and running stats per rank, weight/bias grads summed."""
    ranks = range(len(sizes)) if ranks is None else ranks
    tol = TOL[dtype]
    ref_steps, ref_state = bn_reference(sizes, dtype, ranks)
    group_sizes = [sizes[r] for r in ranks]
    for step, ref in enumerate(ref_steps):
        for i, r in enumerate(ranks):
            got = results[r]['steps'][step]
            for key in ('y', 'gx'):
                torch.testing.assert_close(got[key], rank_slice(ref[key], group_sizes, i), **tol)
        for key in ('gw', 'gb'):
            total = sum(results[r]['steps'][step][key] for r in ranks)
            torch.testing.assert_close(total, ref[key], **tol)
    for r in ranks:
        for key, value in ref_state.items():
            torch.testing.assert_close(results[r]['state'][key], value, **tol)


@pytest.mark.parametrize('path,split,dtype', SYNC_CASES,
                         ids=[f'{p}-{s}-{str(d)[6:]}' for p, s, d in SYNC_CASES])
def test_matches_bn_on_concatenated_batch(two_ranks, path, split, dtype):
    results = [res[path, split, dtype] for res in two_ranks]
    assert_matches_bn(results, SPLITS[split], dtype)
    for res in results:  # one collective per forward and per backward, empty rank too
        assert [(s['fwd'], s['bwd']) for s in res['steps']] == synchronised_counts(STEPS)


@pytest.mark.parametrize('split', EMULATED_SPLITS)
def test_cuda_grad_input_branch_matches_bn_on_concatenated_batch(two_ranks, split):
    """The CUDA backward (torch's one-pass SyncBN kernel, emulated on the CPU by its
    formula in float64) gets the group's sums and count: BN's gradients."""
    assert_matches_bn([res['emulated_cuda', split] for res in two_ranks], SPLITS[split],
                      torch.float64)
    # called at every step of every non-empty rank
    assert [res['emulated_cuda_calls'] for res in two_ranks] == [
        STEPS * sum(SPLITS[s][r] > 0 for s in EMULATED_SPLITS) for r in range(2)]


def test_group_size_one_is_local_bn(two_ranks):
    results = [res['local'] for res in two_ranks]
    for rank, res in enumerate(results):
        assert_matches_bn(results, LOCAL_SIZES, torch.float64, ranks=(rank, ))
        assert [(s['fwd'], s['bwd']) for s in res['steps']] == [(0, 0)] * STEPS


@pytest.mark.parametrize('path', SYNC_BN_PATHS)
def test_autocast_statistics_in_fp32(two_ranks, path):
    sizes = SPLITS['unequal']
    bn = init_affine(nn.BatchNorm2d(C, momentum=MOMENTUM)).double()
    for step in range(STEPS):
        x_all, _ = batches(sizes, torch.float32, step)
        y = bn(x_all.to(torch.bfloat16).double())  # the same rounded input, in float64
        for r, res in enumerate(two_ranks):
            got = res['autocast', path]['steps'][step]['y']
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), rank_slice(y, sizes, r).detach(),
                                       atol=0.03, rtol=0.01)
    for res in two_ranks:
        state = res['autocast', path]['state']
        assert state['running_mean'].dtype == torch.float32
        torch.testing.assert_close(state['running_mean'].double(), bn.running_mean,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state['running_var'].double(), bn.running_var,
                                   atol=1e-5, rtol=1e-5)


def test_eval_mode_is_plain_bn_without_collectives(two_ranks):
    sizes = SPLITS['unequal']
    _, state = bn_reference(sizes, torch.float64, ranks=(0, 1))
    bn = init_affine(nn.BatchNorm2d(C).double())
    bn.load_state_dict(state)
    bn.eval()
    for step in range(STEPS):
        x_all, _ = batches(sizes, torch.float64, step)
        for r, res in enumerate(two_ranks):
            got = res['eval']['steps'][step]
            assert (got['fwd'], got['bwd']) == (0, 0)
            torch.testing.assert_close(got['y'], rank_slice(bn(x_all), sizes, r).detach(),
                                       **TOL[torch.float64])


def test_empty_batches_everywhere_no_hang_no_state_change(two_ranks):
    for res in two_ranks:
        steps = res['all_empty']['steps']
        assert [(s['fwd'], s['bwd']) for s in steps] == synchronised_counts(STEPS, 0)
        for step in steps:
            assert step['y'].shape == (0, C) + SPATIAL
            assert torch.equal(step['gw'], torch.zeros(C, dtype=torch.float64))
        state = res['all_empty']['state']
        assert state['num_batches_tracked'] == 0
        assert torch.equal(state['running_mean'], torch.zeros(C, dtype=torch.float64))


def test_bad_group_size_is_a_clear_error(two_ranks):
    for res in two_ranks:
        assert 'group_size=3 does not divide the world size 2' in res['bad_group_size']
        assert '[1, 2]' in res['bad_group_size']


def test_stalled_peer_is_an_error_not_a_hang(two_ranks):
    stall = two_ranks[0]['stall']
    if stall is None:
        pytest.skip('torch without _set_pg_timeout')
    assert stall['error'] is not None and 'PortableSyncBN' in stall['error']
    assert stall['seconds'] < 6


def four_rank_worker(rank, world_size):
    counter = CollectiveCounter()
    res = {}
    with counter.installed():
        for group_size in (2, None):
            layer = init_affine(PortableSyncBN(C, momentum=MOMENTUM,
                                               group_size=group_size).double())
            res[group_size] = run_steps(layer, GROUP_SIZES, torch.float64, rank, counter)
    res['group_ranks'] = dist.get_process_group_ranks(_process_group(2))
    res['cached'] = _process_group(2) is _process_group(2)
    return res


def test_subgroups_of_two_on_four_ranks():
    results = run_distributed(four_rank_worker, world_size=4, timeout=180)
    for group in ((0, 1), (2, 3)):
        assert_matches_bn([res[2] for res in results], GROUP_SIZES, torch.float64, group)
        for r in group:
            assert results[r]['group_ranks'] == list(group)
            assert results[r]['cached']
    assert_matches_bn([res[None] for res in results], GROUP_SIZES, torch.float64)


def nccl_worker(rank, world_size):
    """Every split in float64 and float32 on cuda:rank, over nccl."""
    counter = CollectiveCounter()
    with counter.installed():
        return {(split, dtype): run_steps(
            init_affine(PortableSyncBN(C, momentum=MOMENTUM).to('cuda', dtype)), sizes,
            dtype, rank, counter, device='cuda')
            for split, sizes in SPLITS.items() for dtype in (torch.float64, torch.float32)}


@pytest.fixture(scope='module')
def two_gpus():
    return run_distributed(nccl_worker, world_size=2, timeout=180, backend='nccl')


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs 2 CUDA devices (nccl)')
@pytest.mark.parametrize('split', SPLITS)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['float64', 'float32'])
def test_nccl_on_two_gpus_matches_bn_on_concatenated_batch(two_gpus, split, dtype):
    """The CUDA paths (fused backward kernel, nccl): BN on the concatenated batch, one
    collective each way per call (and the handshake)."""
    results = [res[split, dtype] for res in two_gpus]
    assert_matches_bn(results, SPLITS[split], dtype)
    for res in results:
        assert [(s['fwd'], s['bwd']) for s in res['steps']] == synchronised_counts(STEPS)

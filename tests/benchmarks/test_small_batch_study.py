"""The small-batch study (benchmarks/small_batch_study.py): the ghost-batch machinery
exactly, and the whole study at a tiny size (outputs produced and sane)."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from benchmarks.small_batch_study import TINY, main
from benchmarks.study.model import GhostNorm
from benchmarks.study.runs import (
    METHODS,
    METHODS_BY_KEY,
    StudyConfig,
    build_model,
    layer_cfgs,
    run_synced,
)
from mmdet_bnplug.layers.mabn import MABN
from norm_helpers import STATISTICS

pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors


def _bn(channels=3, dtype=torch.float64):
    bn = nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _forward_backward(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad


def test_ghost_size_at_least_batch_is_plain_bn():
    torch.manual_seed(0)
    x, dy = torch.randn(6, 3, 4, 5, dtype=torch.float64), torch.randn(6, 3, 4, 5,
                                                                     dtype=torch.float64)
    for ghost_size in (6, 8, None):
        bn = _bn()
        ghost = GhostNorm(copy.deepcopy(bn), ghost_size)
        for got, want in zip(_forward_backward(ghost, x, dy), _forward_backward(bn, x, dy)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for name in STATISTICS:
            torch.testing.assert_close(getattr(ghost.norm, name), getattr(bn, name),
                                       rtol=0, atol=0)
        torch.testing.assert_close(ghost.norm.weight.grad, bn.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(ghost.norm.bias.grad, bn.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize('batch, ghost_size', [(8, 2), (12, 4), (7, 2)])
def test_ghost_bn_normalises_each_chunk_separately(batch, ghost_size):
    """Against an independent float64 reference: BN's formula on every chunk, the
    running statistics updated once per chunk in order, autograd through it."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, 4, 5, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    bn = _bn()
    ghost = GhostNorm(copy.deepcopy(bn), ghost_size)
    y, dx = _forward_backward(ghost, x, dy)

    xr = x.clone().requires_grad_()
    weight = bn.weight.detach().clone().requires_grad_()
    bias = bn.bias.detach().clone().requires_grad_()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    outs = []
    for chunk in xr.split(ghost_size):
        mu = chunk.mean((0, 2, 3), keepdim=True)
        sq = ((chunk - mu) ** 2).mean((0, 2, 3), keepdim=True)
        outs.append((chunk - mu) / torch.sqrt(sq + bn.eps) * weight.view(1, -1, 1, 1)
                    + bias.view(1, -1, 1, 1))
        n = chunk.numel() // chunk.shape[1]
        mean = 0.9 * mean + 0.1 * mu.detach().flatten()
        var = 0.9 * var + 0.1 * sq.detach().flatten() * n / (n - 1)
    ref = torch.cat(outs)
    ref.backward(dy)
    torch.testing.assert_close(y, ref.detach())
    torch.testing.assert_close(dx, xr.grad)
    torch.testing.assert_close(ghost.norm.weight.grad, weight.grad)
    torch.testing.assert_close(ghost.norm.bias.grad, bias.grad)
    torch.testing.assert_close(ghost.norm.running_mean, mean)
    torch.testing.assert_close(ghost.norm.running_var, var)
    assert int(ghost.norm.num_batches_tracked) == math.ceil(batch / ghost_size)


def test_ghost_mabn_is_one_layer_call_per_chunk():
    """Each chunk advances MABN's counter and writes its own ring-buffer slot; outputs,
    gradients and state equal calling the layer chunk by chunk."""
    torch.manual_seed(2)
    mabn = MABN(3, buffer_size=4, warmup_iters=0, renorm_iters=0).double()
    ghost, alone = GhostNorm(copy.deepcopy(mabn), 2), copy.deepcopy(mabn)
    for it in range(3):  # batch statistics first (t <= buffer_size), then the averages
        x = torch.randn(8, 3, 4, 5, dtype=torch.float64) * (1 + it)
        dy = torch.randn_like(x)
        y, dx = _forward_backward(ghost, x, dy)
        xr = x.clone().requires_grad_()
        yr = torch.cat([alone(chunk) for chunk in xr.split(2)])
        yr.backward(dy)
        torch.testing.assert_close(y, yr.detach(), rtol=0, atol=0)
        torch.testing.assert_close(dx, xr.grad, rtol=0, atol=0)
        assert int(ghost.norm.num_batches_tracked) == 4 * (it + 1)
        # slot t % 4 of chunk t: this step's four chunks fill the four slots
        second_moments = torch.stack([(c ** 2).mean((0, 2, 3)) for c in x.split(2)])
        torch.testing.assert_close(ghost.norm.buffer_x2[[1, 2, 3, 0]], second_moments)
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(ghost.norm.state_dict()[name], value, rtol=0, atol=0)


def test_ghost_norm_eval_mode_and_arguments():
    bn = _bn()
    bn.running_mean.uniform_(-1, 1)
    ghost = GhostNorm(copy.deepcopy(bn), 2).eval()
    x = torch.randn(8, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), bn.eval()(x), rtol=0, atol=0)
    for bad in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match='ghost_size'):
            GhostNorm(bn, bad)


@pytest.mark.parametrize('key', [m.key for m in METHODS])
def test_built_models_normalise_each_ghost_chunk_alone(key):
    """Every norm layer of every study model, not just the wrapper: in a training
    forward, changing one sample changes the outputs of exactly its own ghost chunk
    (layers with batch statistics: BN, MABN in its batch-statistics phase,
    PortableSyncBN without a process group), only its own (GN, EvalBN), or the whole
    batch (norm batch = SGD batch). An unwrapped layer anywhere would leak the change
    into every sample."""
    config = StudyConfig(**TINY)
    method = METHODS_BY_KEY[key]
    torch.manual_seed(0)
    model = build_model(config, method).double().train()
    local = config.batch // method.procs
    chunk = layer_cfgs(config, method)[2] or local
    x = torch.randn(local, 3, 8, 8, dtype=torch.float64)
    changed_sample = min(chunk, local - 1)  # in the second chunk when there is one
    x2 = x.clone()
    x2[changed_sample] = torch.randn_like(x2[changed_sample]) * 3
    with torch.no_grad():
        y, y2 = copy.deepcopy(model)(x), copy.deepcopy(model)(x2)
    changed = set(torch.nonzero((y - y2).abs().amax(1) > 1e-9).flatten().tolist())
    if method.norm in ('GN', 'EvalBN'):
        want = {changed_sample}
    else:
        first = changed_sample // chunk * chunk
        want = set(range(first, first + chunk))
    assert changed == want


def test_layer_cfgs_mabn_counts_ghost_chunks():
    config = StudyConfig(batch=32, steps=1000, warmup_steps=100, mabn_renorm_frac=0.2)
    norm_cfg, conv_cfg, ghost = layer_cfgs(config, METHODS_BY_KEY['mabn2'])
    assert ghost == 2 and conv_cfg == dict(type='ConvWC')
    assert norm_cfg == dict(type='MABN', buffer_size=16, warmup_iters=1600,
                            renorm_iters=3200)
    norm_cfg, _, ghost = layer_cfgs(config, METHODS_BY_KEY['mabn32'])
    assert ghost is None and norm_cfg['buffer_size'] == 1 and norm_cfg['warmup_iters'] == 100
    assert layer_cfgs(config, METHODS_BY_KEY['bn32'])[2] is None
    assert layer_cfgs(config, METHODS_BY_KEY['gn'])[2] is None
    assert layer_cfgs(config, METHODS_BY_KEY['syncbn2x2'])[2] == 2  # per process
    assert METHODS_BY_KEY['syncbn2x2'].effective_norm_batch(32) == 4


def test_synced_2x2_equals_bn_at_4():
    """PortableSyncBN over 2 gloo processes x ghost 2 trains exactly like one process
    with ghost 4: the same normalisation groups, the same averaged gradients."""
    config = StudyConfig(**dict(TINY, steps=4))
    synced = run_synced(config, METHODS_BY_KEY['syncbn2x2'], seed=0)
    from benchmarks.study.runs import run_single
    single, _ = run_single(config, METHODS_BY_KEY['bn4'], seed=0)
    assert synced['norm_batch'] == single['norm_batch'] == 4
    assert len(synced['first_losses']) == 4
    torch.testing.assert_close(torch.tensor(synced['first_losses']),
                               torch.tensor(single['first_losses']), rtol=1e-5, atol=0)


def test_tiny_study_writes_sane_outputs(tmp_path):
    keys = [m.key for m in METHODS if m.procs == 1]
    main(['--tiny', '--seeds', '2', '--jobs', '0', '--methods', *keys,
          '--out-dir', str(tmp_path / 'img'), '--out-md', str(tmp_path / 'r.md')])
    data = json.loads((tmp_path / 'r.json').read_text())
    records = data['records']
    assert sorted((r['key'], r['seed']) for r in records) == sorted(
        (k, s) for k in keys for s in (0, 1))
    for r in records:
        assert 0 <= r['acc'] <= 1 and not r['diverged'], r
        assert r['steps'] == StudyConfig(**TINY).schedule(r['phase'])[0]
        assert all(math.isfinite(v) for v in r['loss_curve'] + r['grad_norm_curve'])
        has_bn = r['key'] in ('bn2', 'bn4', 'bn16', 'bn32')
        assert (r['acc_reestimated'] is not None) == has_bn
    assert data['meta']['runs'] == len(records)
    page = (tmp_path / 'r.md').read_text()
    assert 'Gap MABN closes' in page and 'img/small_batch_study.png' in page
    for method in METHODS:
        if method.procs == 1:
            assert f'| {method.label} |' in page
    for png in ('small_batch_study.png', 'small_batch_study_training.png'):
        assert (tmp_path / 'img' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

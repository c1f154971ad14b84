"""Synchronised training through the tools equals one big batch: the PortableSyncBN toy
trained by ``tools/dist_train.sh`` as 4 processes x 2 images and by ``tools/train.py``
as 1 process x 8 images, from the same checkpoint on the same images (the sampler's
global order is the same; RandomFlip off), takes the same optimizer steps. Without
GlobalLossNormHook it does not (RetinaHead normalises each rank's loss by its own count
of positive anchors). tests/analysis/test_sync_check.py shows the same for one step in
float64 outside the runner; this is the run a user starts."""
import json
import os.path as osp
import sys

import pytest
import torch

from conftest import REPO, SHORT, data_root_options, run_tool
from dist_utils import free_port, run_launcher
from mmdet_bnplug.utils.outputs import relative_change
from norm_helpers import STATISTICS

SYNCBN_TOY = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_syncbn_toy.py')
ITERS = 3
OPTIONS = [*SHORT, f'train_cfg.max_iters={ITERS}', 'train_cfg.val_begin=100',
           f'default_hooks.checkpoint.interval={ITERS}',
           'train_dataloader.dataset.pipeline.3.prob=0.0']  # RandomFlip
TIMEOUT_S = 600


def train(tmp_path, name, procs, load_from, tiny_synthetic, hook=True):
    """Train the toy for ``ITERS`` iterations at 8 images per iteration in all; returns
    ``(final state_dict, grad_norm of each iteration)`` (the norm DDP's averaged
    gradient has, as mmengine logs it)."""
    work_dir = tmp_path / name
    options = [*OPTIONS, *data_root_options(tiny_synthetic), f'load_from={load_from}',
               f'train_dataloader.batch_size={8 // procs}']
    if not hook:
        options.append('custom_hooks=[]')
    args = ['--work-dir', str(work_dir), '--cfg-options', *options]
    if procs == 1:
        result = run_tool(['tools/train.py', SYNCBN_TOY, *args], timeout=TIMEOUT_S)
    else:
        result = run_launcher(['bash', 'tools/dist_train.sh', SYNCBN_TOY, str(procs), *args],
                              REPO, TIMEOUT_S,
                              env=dict(PYTHON=sys.executable, PORT=str(free_port())))
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(work_dir / f'iter_{ITERS}.pth', map_location='cpu')['state_dict']
    scalars = next(work_dir.glob('*/vis_data/scalars.json'))
    grad_norms = [json.loads(line)['grad_norm'] for line in scalars.read_text().splitlines()
                  if 'grad_norm' in line]
    assert len(grad_norms) == ITERS
    return state, grad_norms




def update_difference(start, reference, other):
    """Relative L2 difference of the parameters' updates (final - start; the running
    statistics, equal either way, left out)."""
    keys = [key for key in reference if not key.endswith(STATISTICS)]

    def updates(state):
        return [state[key].double() - start[key].double() for key in keys]
    return relative_change(updates(other), updates(reference))


@pytest.fixture(scope='module')
def runs(trained_toy, tmp_path_factory):
    """The BN toy's checkpoint as the common start; the 1 x 8 run; 4 x 2 with and
    without the hook."""
    tiny_synthetic, _, checkpoint = trained_toy
    tmp_path = tmp_path_factory.mktemp('sync_training')
    start = torch.load(checkpoint, map_location='cpu')['state_dict']
    return dict(start=start,
                one=train(tmp_path, '1x8', 1, checkpoint, tiny_synthetic),
                fixed=train(tmp_path, '4x2', 4, checkpoint, tiny_synthetic),
                per_rank=train(tmp_path, '4x2_no_hook', 4, checkpoint, tiny_synthetic,
                               hook=False))


def test_4x2_with_the_hook_trains_as_1x8(runs):
    (one, one_norms), (fixed, fixed_norms) = runs['one'], runs['fixed']
    # float32 and another order of summation: 2e-5 and 2e-7 measured
    assert update_difference(runs['start'], one, fixed) < 2e-4
    torch.testing.assert_close(fixed_norms, one_norms, rtol=1e-5, atol=0)


def test_4x2_without_the_hook_does_not(runs):
    """The trap the hook closes: the same run without it takes other steps."""
    (one, one_norms), (per_rank, per_rank_norms) = runs['one'], runs['per_rank']
    # 0.36 and 6% measured
    assert update_difference(runs['start'], one, per_rank) > 0.1
    assert max(abs(a / b - 1) for a, b in zip(per_rank_norms, one_norms)) > 0.02

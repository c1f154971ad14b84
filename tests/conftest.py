"""Shared fixtures: paths of the repository, a tiny synthetic dataset, one thread,
MABN's two training paths."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmdet_bnplug.synthetic import SyntheticSpec, generate

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY_BN_CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_bn_toy.py')


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=['compiled', 'pytorch'])
def mabn_path(request, monkeypatch):
    """Runs a test on each of MABN's CPU training paths: 'compiled' (csrc/mabn_cpu.cpp,
    which must be built) and 'pytorch' (_MABNFunction, the path of every other device)."""
    from mmdet_bnplug.norms import mabn
    if request.param == 'pytorch':
        monkeypatch.setattr(mabn, '_mabn_cpu', None)
        monkeypatch.setattr(mabn, '_warn_not_compiled', lambda: None)
    elif mabn._mabn_cpu is None:
        pytest.fail("MABN's compiled CPU step is not built (pip install "
                    '--no-build-isolation -e .)')
    return request.param


@pytest.fixture(scope='session')
def tiny_synthetic(tmp_path_factory):
    """A 16-image train / 8-image val synthetic dataset; returns its root directory."""
    root = tmp_path_factory.mktemp('synthetic')
    generate(str(root), num_train=16, num_val=8, seed=3, spec=SyntheticSpec())
    return str(root)


def data_root_options(root):
    """``--cfg-options`` entries pointing a toy config at another synthetic dataset root."""
    root = root.rstrip('/') + '/'
    return [f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/val.json',
            f'test_evaluator.ann_file={root}annotations/val.json']


def run_tool(args, timeout=600, env=None):
    """Run ``python <args>`` from the repository root; return the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)

"""Shared fixtures: paths of the repository, a tiny synthetic dataset, one thread,
MABN's two training paths, PortableSyncBN's two CPU paths; the ``cuda`` marker."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from mmdet_bnplug.testing.synthetic import SyntheticSpec, generate
from mmdet_bnplug.testing.threads import torch_threads

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# the tools' own support modules (run_config, checkpoint_io) are imported as the tools do
sys.path.insert(0, osp.join(REPO, 'tools'))
TOY_BN_CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_bn_toy.py')


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA device, skipped without one; '
                            'benchmarks/gpu_check.sh runs exactly these tests')


def pytest_collection_modifyitems(config, items):
    """Without CUDA, every test marked ``cuda`` is skipped."""
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker('cuda'):
            item.add_marker(pytest.mark.skip(reason='needs CUDA'))


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP stalls on a busy machine."""
    with torch_threads(1):
        yield


@pytest.fixture(params=['compiled', 'pytorch'])
def mabn_path(request):
    """Runs a test on each implementation of MABN's ops on CPU: 'compiled'
    (csrc/mabn_cpu.cpp, which must be built) and 'pytorch' (the PyTorch implementation
    in ops/mabn.py, that of every other device)."""
    from mmdet_bnplug.ops import mabn as mabn_ops
    if mabn_ops.cpu_kernels is None:
        pytest.fail("MABN's compiled CPU kernels are not built (pip install "
                    '--no-build-isolation -e .)')
    if request.param == 'pytorch':
        with mabn_ops.pytorch_on_cpu():
            yield request.param
    else:
        yield request.param


@pytest.fixture(params=['compiled', 'pytorch'])
def sync_bn_cpu_path(request):
    """Runs a test on each of PortableSyncBN's CPU implementations (norm_helpers)."""
    from norm_helpers import sync_bn_path
    with sync_bn_path(request.param):
        yield request.param


@pytest.fixture(scope='session')
def tiny_synthetic(tmp_path_factory):
    """A 16-image train / 8-image val synthetic dataset; returns its root directory."""
    root = tmp_path_factory.mktemp('synthetic')
    generate(str(root), num_train=16, num_val=8, seed=3, spec=SyntheticSpec())
    return str(root)


# a few iterations of a toy config, every stage still run (validation, checkpoint, logs)
SHORT = ['train_cfg.max_iters=4', 'train_cfg.val_interval=4',
         'default_hooks.checkpoint.interval=4', 'default_hooks.logger.interval=1',
         'train_dataloader.batch_size=4', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
         'val_dataloader.persistent_workers=False', 'test_dataloader.num_workers=0',
         'test_dataloader.persistent_workers=False',
         # an untrained RetinaNet scores about its prior, 0.01: keep every box
         'model.test_cfg.score_thr=0.0']


@pytest.fixture(scope='session')
def trained_toy(tiny_synthetic, tmp_path_factory):
    """The BN toy trained for 4 iterations by tools/train.py on ``tiny_synthetic``:
    ``(dataset root, work dir, checkpoint path)``."""
    work_dir = str(tmp_path_factory.mktemp('trained_toy'))
    result = run_tool(['tools/train.py', TOY_BN_CONFIG, '--work-dir', work_dir,
                       '--cfg-options', *SHORT, *data_root_options(tiny_synthetic)])
    assert result.returncode == 0, result.stderr[-3000:]
    return tiny_synthetic, work_dir, osp.join(work_dir, 'iter_4.pth')


def data_root_options(root):
    """``--cfg-options`` entries pointing a toy config at another synthetic dataset root."""
    root = root.rstrip('/') + '/'
    return [f'train_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}annotations/val.json',
            f'test_evaluator.ann_file={root}annotations/val.json']


def on_dataset(cfg, root):
    """``cfg`` (an mmengine Config of a toy) pointed at the synthetic dataset under ``root``,
    as ``data_root_options`` does for a tool; returns ``cfg``."""
    cfg.merge_from_dict(dict(option.split('=', 1) for option in data_root_options(root)))
    return cfg


def pythonpath(directory):
    """A PYTHONPATH value with ``directory`` before the current one (for subprocesses that
    import a test-only module from there)."""
    return os.pathsep.join(filter(None, [directory, os.environ.get('PYTHONPATH')]))


def run_tool(args, timeout=600, env=None, cwd=REPO):
    """Run ``python <args>`` in ``cwd`` (default: the repository root, where relative tool
    paths resolve); return the CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)

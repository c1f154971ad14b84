"""The mmpretrain configs (configs/mmpretrain/): each builds through mmpretrain's registry
with custom_imports, has the plugin's layers where it puts them, and trains a step.

mmpretrain imports torchvision, and PyPI's torchvision does not load beside this
project's CPU torch 2.13, so these run in the second environment that ``make test``
installs (.venv-mmpretrain: torch 2.14.1 + torchvision 0.29.1, mmpretrain 1.2.0 and an
installed copy of this package), named by BNPLUG_MMPRETRAIN_PYTHON.
"""
import glob
import json
import os
import os.path as osp
import subprocess

import pytest

from conftest import REPO

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'mmpretrain', '*.py')))
STEP = osp.join(osp.dirname(osp.abspath(__file__)), 'mmpretrain_step.py')


@pytest.fixture(scope='module')
def pretrain_python():
    python = os.environ.get('BNPLUG_MMPRETRAIN_PYTHON')
    if not python:
        pytest.fail('BNPLUG_MMPRETRAIN_PYTHON is not set: run the tests with `make test`, '
                    'which installs the mmpretrain environment and sets it')
    assert os.access(python, os.X_OK), f'BNPLUG_MMPRETRAIN_PYTHON={python} is not executable'
    return python


def test_there_is_a_config():
    assert CONFIGS


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.basename(p) for p in CONFIGS])
def test_builds_and_steps(pretrain_python, path, tmp_path):
    result = subprocess.run([pretrain_python, STEP, path], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # the installed copy in that environment, not this checkout
    assert not summary['plugin'].startswith(REPO + os.sep + 'mmdet_bnplug'), summary
    assert summary['norms'] == 53 and summary['convs'] == 53, summary  # ResNet-50
    assert summary['steps'] == [1], summary  # every MABN took one training step
    assert summary['conv1_moved'] and summary['loss'] > 0, summary

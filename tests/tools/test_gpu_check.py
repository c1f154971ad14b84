"""benchmarks/gpu_check.sh: its test selection is exactly the suite's CUDA-only tests, and
without a GPU it says so in one line and exits 0."""
import json
import os
import os.path as osp
import subprocess
import sys

import torch

from benchmarks.gpu_check import TEST_SELECTION
from conftest import REPO, pythonpath

NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES='')  # as on a machine without one


def test_selection_is_exactly_the_tests_skipped_without_cuda(tmp_path):
    """One collection of the whole suite as on a machine without CUDA (no test runs):
    the tests gpu_check.sh selects are those that a skip mark whose reason names CUDA or
    a GPU would skip, e.g. a plain ``skipif(not torch.cuda.is_available())`` without the
    ``cuda`` marker would be missing from the selection."""
    out = tmp_path / 'collected.json'
    env = dict(NO_GPU, CUDA_SKIPS_OUT=str(out),
               PYTHONPATH=pythonpath(osp.dirname(osp.abspath(__file__))))
    result = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q',
                             '-p', 'cuda_skips_plugin', '-p', 'no:cacheprovider',
                             *TEST_SELECTION], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    collected = json.loads(out.read_text())
    selected, skipped = set(collected['selected']), set(collected['cuda_skipped'])
    assert selected and selected == skipped, dict(
        skipped_not_selected=sorted(skipped - selected),
        selected_not_skipped=sorted(selected - skipped))


def test_without_a_gpu_one_line_and_exit_0():
    result = subprocess.run(['bash', 'benchmarks/gpu_check.sh'], cwd=REPO, env=dict(
        NO_GPU, PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f'gpu_check: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() '
        'is False), nothing to check']

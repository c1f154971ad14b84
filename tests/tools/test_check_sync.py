"""tools/check_sync.py from the command line: a passing check, and bad input as one
``error:`` line with exit code 2 (the comparisons themselves:
tests/analysis/test_sync_check.py)."""
import os.path as osp

import pytest

from conftest import REPO, run_tool

SYNC_RETINANET = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_syncbn_toy.py')


def _error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), \
        (result.returncode, result.stderr[-2000:])
    return lines[0]


@pytest.fixture
def configs(tmp_path, tiny_synthetic):
    root = tiny_synthetic.rstrip('/') + '/'
    data = f"train_dataloader = dict(dataset=dict(data_root={root!r}))\n"
    paths = {}
    for name, text in {
        'typo': "model = dict(backbone=dict(norm_cfg=dict(type='PortabelSyncBN')))\n",
        'no_loader': 'train_dataloader = None\n',
        'ok': data,
        'unfixed': data + 'custom_hooks = []\n',
    }.items():
        paths[name] = tmp_path / f'{name}.py'
        paths[name].write_text(f'_base_ = {SYNC_RETINANET!r}\n' + text)
    return paths


def test_bad_input_is_one_line(configs):
    line = _error_line(run_tool(['tools/check_sync.py', str(configs['typo'])]))
    assert "'PortabelSyncBN'" in line and 'PortableSyncBN' in line.split("'PortabelSyncBN'")[1]
    line = _error_line(run_tool(['tools/check_sync.py', str(configs['no_loader'])]))
    assert 'no train_dataloader' in line
    line = _error_line(run_tool(['tools/check_sync.py', str(configs['ok']), '--procs', '3']))
    assert '--procs 3 does not divide the global batch 8' in line


def test_a_passing_check_prints_the_tables_and_exits_0(configs):
    result = run_tool(['tools/check_sync.py', str(configs['ok']), '--procs', '2',
                       '--batch', '4', '--double'], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'loss normalisers global (GlobalLossNormHook)' in result.stdout
    assert 'backbone.layer1.0.bn1' in result.stdout and 'bbox_head' in result.stdout
    assert result.stdout.strip().endswith('equal within 1e-06: every norm output and '
                                          'statistic, loss and gradient')


def test_a_failing_check_names_the_cause_and_exits_1(configs):
    result = run_tool(['tools/check_sync.py', str(configs['unfixed']), '--procs', '2',
                       '--batch', '4', '--double'], timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'likely cause: loss normalisation: bbox_head (RetinaHead)' in result.stdout

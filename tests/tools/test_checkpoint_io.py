"""The tools never write over their inputs and never leave a half-written output."""
import os

import pytest
import torch

import checkpoint_io
from conftest import run_tool


def test_output_that_is_the_input_or_a_link_to_it_is_refused(tmp_path):
    src = tmp_path / 'in.pth'
    torch.save({'state_dict': {}}, str(src))
    (tmp_path / 'sym.pth').symlink_to(src)
    os.link(src, tmp_path / 'hard.pth')
    for out in ('in.pth', 'sym.pth', 'hard.pth', './in.pth'):
        with pytest.raises(ValueError, match='is the input'):
            checkpoint_io.check_output_path(str(tmp_path / out), [str(src)])
    checkpoint_io.check_output_path(str(tmp_path / 'new.pth'), [str(src), None])


def test_convert_checkpoint_refuses_a_symlink_to_its_input(trained_toy, tmp_path):
    _, _, checkpoint = trained_toy
    src = tmp_path / 'in.pth'
    src.write_bytes(open(checkpoint, 'rb').read())
    before = src.read_bytes()
    (tmp_path / 'out.pth').symlink_to(src)
    result = run_tool(['tools/convert_checkpoint.py', str(src), str(tmp_path / 'out.pth'),
                       '--to', 'EvalBN'], timeout=300)
    assert result.returncode == 2 and 'is the input' in result.stderr
    assert src.read_bytes() == before  # optimizer state and config still there


def test_save_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / 'out.pth'
    checkpoint_io.save_atomic({'a': torch.ones(3)}, str(out))
    assert torch.equal(torch.load(str(out))['a'], torch.ones(3))

    def interrupted(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_atomic({'a': torch.zeros(3)}, str(out))
    assert os.listdir(tmp_path) == ['out.pth']  # no temporary left behind
    monkeypatch.undo()
    assert torch.equal(torch.load(str(out))['a'], torch.ones(3))  # the old file, whole


def test_save_replaces_a_link_not_its_target(tmp_path):
    target = tmp_path / 'target.pth'
    torch.save({'keep': 1}, str(target))
    (tmp_path / 'link.pth').symlink_to(target)
    checkpoint_io.save_atomic({'new': 2}, str(tmp_path / 'link.pth'))
    assert torch.load(str(target)) == {'keep': 1}
    assert torch.load(str(tmp_path / 'link.pth')) == {'new': 2}

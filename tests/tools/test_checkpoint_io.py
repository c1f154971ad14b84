"""The tools never run a config stored in a checkpoint, never write over their inputs or
anything but a regular file, and never leave a half-written output."""
import errno
import os
import os.path as osp
import shlex
import signal
import stat
import subprocess
import sys

from cli import InputError

import pytest
import torch
from mmengine.config import Config

import checkpoint_io
from conftest import REPO, SHORT, TOY_BN_CONFIG, data_root_options, run_tool


def error_line(result):
    """The one ``error:`` line a tool printed, having exited with 2 and no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    return lines[0]


def test_a_config_stored_in_a_checkpoint_is_never_run(trained_toy, tmp_path):
    _, _, checkpoint = trained_toy
    marker = tmp_path / 'pwned'
    state = torch.load(checkpoint, map_location='cpu')
    command = 'touch ' + shlex.quote(str(marker))
    state['meta']['cfg'] += f'\n_x = __import__("os").system({command!r})\n'
    Config.fromstring(state['meta']['cfg'], file_format='.py')
    assert marker.exists()  # mmengine runs the payload when it loads the text
    marker.unlink()
    evil = str(tmp_path / 'evil.pth')
    torch.save(state, evil)
    out = tmp_path / 'out.pth'
    for args in (['tools/inspect_norms.py', '--checkpoint', evil],
                 ['tools/convert_checkpoint.py', evil, str(out), '--to', 'EvalBN']):
        result = run_tool(args, timeout=300)
        assert not marker.exists(), f'{args[0]} ran the stored config'
        line = error_line(result)
        assert line.startswith('error: a config file is needed')
        assert "meta['cfg']" in line and 'is Python' in line and 'work dir' in line
    assert not out.exists()


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
                       '--to', 'EvalBN', '--config', TOY_BN_CONFIG], timeout=300)
    assert 'is the input' in error_line(result)
    assert src.read_bytes() == before  # optimizer state and config still there


def test_test_py_refuses_to_dump_predictions_over_its_checkpoint(trained_toy, tmp_path):
    root, _, checkpoint = trained_toy
    ckpt = tmp_path / 'ck.pkl'  # --out must end in .pkl: a checkpoint may too
    ckpt.write_bytes(open(checkpoint, 'rb').read())
    before = ckpt.read_bytes()
    result = run_tool(['tools/test.py', TOY_BN_CONFIG, str(ckpt), '--out', str(ckpt),
                       '--work-dir', str(tmp_path / 'work'), '--cfg-options', *SHORT,
                       *data_root_options(root)], timeout=300)
    assert 'is the input' in error_line(result)
    assert ckpt.read_bytes() == before


def test_outputs_that_are_not_regular_files_are_refused(tmp_path):
    fifo, directory = tmp_path / 'fifo.pth', tmp_path / 'dir.pth'
    os.mkfifo(fifo)
    directory.mkdir()
    for out, kind in ((fifo, 'a FIFO'), (directory, 'a directory')):
        with pytest.raises(InputError, match=f'it is {kind}, not a regular file'):
            checkpoint_io.save_atomic({'a': 1}, str(out))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(directory) == []
    # check only: were the check missing, save_atomic would replace /dev/null (as root)
    with pytest.raises(InputError, match="'/dev/null': it is a character device"):
        checkpoint_io.check_output_path('/dev/null')
    with pytest.raises(InputError, match='the output path is empty'):
        checkpoint_io.save_atomic({'a': 1}, '')
    (tmp_path / 'file').write_text('')
    with pytest.raises(InputError, match='file/out.pth.: Not a directory'):
        checkpoint_io.save_atomic({'a': 1}, str(tmp_path / 'file' / 'out.pth'))
    assert sorted(os.listdir(tmp_path)) == ['dir.pth', 'fifo.pth', 'file']


def test_convert_checkpoint_names_an_unwritable_output_in_one_line(trained_toy, tmp_path):
    _, _, checkpoint = trained_toy
    fifo = tmp_path / 'fifo.pth'
    os.mkfifo(fifo)
    (tmp_path / 'dir.pth').mkdir()
    for out, reason in ((fifo, 'it is a FIFO'), (tmp_path / 'dir.pth', 'it is a directory'),
                        ('', 'the output path is empty')):
        line = error_line(run_tool(['tools/convert_checkpoint.py', checkpoint, str(out),
                                    '--to', 'EvalBN', '--config', TOY_BN_CONFIG]))
        assert reason in line and (not out or repr(str(out)) in line)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_full_disk_is_one_error_naming_the_output(tmp_path, monkeypatch):
    out = tmp_path / 'out.pth'
    torch.save({'old': 1}, str(out))

    def full_disk(obj, f):
        f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(InputError) as err:
        checkpoint_io.save_atomic({'new': 2}, str(out))
    assert str(err.value) == f'cannot write {str(out)!r}: No space left on device'
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['out.pth'] and torch.load(str(out)) == {'old': 1}


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


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_signal_during_save_removes_the_temporary(signum, tmp_path, monkeypatch):
    """The signal reaches the handler there was, after the cleanup; here a handler that
    returns, so the save fails with one line."""
    received = []

    def handler(sig, frame):
        received.append(sig)

    def signalled(obj, f):
        f.write(b'half a checkpoint')
        os.kill(os.getpid(), signum)
        f.write(b' and the rest')

    previous = signal.signal(signum, handler)
    try:
        monkeypatch.setattr(torch, 'save', signalled)
        with pytest.raises(InputError, match=f'interrupted by {signum.name}'):
            checkpoint_io.save_atomic({'a': 1}, str(tmp_path / 'out.pth'))
        assert received == [signum] and signal.getsignal(signum) is handler
    finally:
        signal.signal(signum, previous)
    assert os.listdir(tmp_path) == []


def test_sigterm_during_save_ends_the_process_and_leaves_no_temporary(tmp_path):
    out = tmp_path / 'out.pth'
    torch.save({'old': 1}, str(out))
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.join(REPO, 'tools')!r})
import torch
import checkpoint_io

def killed(obj, f):
    f.write(b'half a checkpoint')
    f.flush()
    os.kill(os.getpid(), signal.SIGTERM)
    f.write(b' and the rest')

torch.save = killed
checkpoint_io.save_atomic({{'new': 2}}, {str(out)!r})
"""
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGTERM, result.stderr[-3000:]
    assert os.listdir(tmp_path) == ['out.pth'] and torch.load(str(out)) == {'old': 1}


def test_the_output_gets_the_mode_torch_save_would_give_it(tmp_path):
    umask = os.umask(0o027)
    try:
        checkpoint_io.save_atomic({'a': 1}, str(tmp_path / 'new.pth'))
        existing = tmp_path / 'existing.pth'
        existing.write_bytes(b'')
        existing.chmod(0o604)
        checkpoint_io.save_atomic({'a': 1}, str(existing))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / 'new.pth').st_mode) == 0o640  # 0o666 & ~umask
    assert stat.S_IMODE(os.stat(existing).st_mode) == 0o604


def test_save_replaces_a_link_not_its_target(tmp_path):
    target = tmp_path / 'target.pth'
    torch.save({'keep': 1}, str(target))
    (tmp_path / 'link.pth').symlink_to(target)
    checkpoint_io.save_atomic({'new': 2}, str(tmp_path / 'link.pth'))
    assert torch.load(str(target)) == {'keep': 1}
    assert torch.load(str(tmp_path / 'link.pth')) == {'new': 2}


def test_a_checkpoint_that_does_not_fit_the_config_is_one_error(trained_toy):
    """A strict load of the BN RetinaNet's checkpoint into the toy Mask R-CNN."""
    mask_rcnn = osp.join(REPO, 'configs', 'toy', 'mask_rcnn_r18_fpn_bn_toy.py')
    with pytest.raises(InputError, match='does not fit the model of .*mask_rcnn.*Missing'):
        checkpoint_io.load_model(mask_rcnn, trained_toy[2], strict=True)

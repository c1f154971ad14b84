"""Safe loading after ``import mmdet_bnplug``: mmengine's checkpoints load, and a hostile
checkpoint runs nothing, corrupts no memory and changes no process-wide state, through
``torch.load``, mmengine or any of the tools."""
import argparse
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

import mmdet_bnplug  # noqa: F401  (applies the patch)
from conftest import REPO, TOY_BN_CONFIG, data_root_options, run_tool
from mmdet_bnplug import patches
from mmdet_bnplug.patches import safe_loading


class _Call:
    """Pickles as ``fn(*args)``: how a crafted checkpoint asks the unpickler to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class _Build(_Call):
    """Pickles as ``fn(*args)`` followed by the given ``__setstate__`` state (BUILD)."""

    def __init__(self, fn, args, state):
        super().__init__(fn, *args)
        self.state = state

    def __reduce__(self):
        return self.fn, self.args, self.state


def _exec_payloads(marker):
    """Payloads that, if loaded, create ``marker``: name -> object to pickle."""
    code = f'open({str(marker)!r}, "w").close()'
    builtins_module = _Call(getattr, getattr, '__self__')  # getattr(getattr, '__self__')
    exec_fn = _Call(getattr, builtins_module, 'exec')
    # torch allow-lists _rebuild_from_type_v2, which calls its first argument
    rebuild = torch._tensor._rebuild_from_type_v2
    return {
        'getattr chain': _Call(rebuild, exec_fn, torch.Tensor, (code, ), {}),
        'direct exec': _Call(exec, code),
        'os.system': _Call(os.system, f'touch {marker}'),
        'getattr on HistoryBuffer': _Call(rebuild, _Call(getattr, HistoryBuffer, '__init__'),
                                          torch.Tensor, (None, ), {}),
    }


@pytest.mark.parametrize('name', list(_exec_payloads('x')))
def test_torch_load_refuses_code_execution(tmp_path, name):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'extra': _exec_payloads(marker)[name]},
               str(path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(path))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(torch.nn.Linear(2, 2), str(path), map_location='cpu')
    assert not marker.exists()


def test_the_getattr_stand_in_serves_history_buffer_statistics_only():
    assert safe_loading.history_buffer_method(HistoryBuffer, 'mean') is HistoryBuffer.mean
    for owner, name in [(HistoryBuffer, '__init__'), (HistoryBuffer, 'update'),
                        (getattr, '__self__'), (os, 'system'), (HistoryBuffer, 3)]:
        with pytest.raises(pickle.UnpicklingError, match='refused'):
            safe_loading.history_buffer_method(owner, name)
    allowed = torch.serialization.get_safe_globals()
    assert getattr not in allowed and exec not in allowed and eval not in allowed
    assert all(entry[0] is not getattr for entry in allowed if isinstance(entry, tuple))


def test_mmengine_checkpoint_with_message_hub_loads_safely(tmp_path):
    hub = MessageHub.get_instance('bnplug-safe-loading-test')
    for value in (1.0, np.float64(2.5), np.array(3.0, dtype=np.float32)):
        hub.update_scalar('train/loss', value)
    model = torch.nn.Conv2d(3, 4, 3)
    ckpt = dict(meta=dict(iter=3, seed=np.int64(0), dataset_meta=dict(classes=('a', 'b'))),
                state_dict=model.state_dict(), message_hub=hub.state_dict(),
                arrays=[np.ones(4, dtype=dtype) for dtype in (np.int64, np.uint8, bool)])
    path = tmp_path / 'ckpt.pth'
    save_checkpoint(ckpt, str(path))
    # torch's default is weights_only=True: this is the call mmengine makes
    loaded = torch.load(str(path), map_location='cpu')
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() == pytest.approx(6.5 / 3)
    assert loaded['meta']['seed'] == 0
    fresh = torch.nn.Conv2d(3, 4, 3)
    load_checkpoint(fresh, str(path), map_location='cpu', strict=True)
    assert torch.equal(fresh.weight, model.weight)


class _NotAllowListed:
    pass


def test_safe_loading_still_refuses_arbitrary_classes(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'payload': _NotAllowListed()}, str(path))
    with pytest.raises(pickle.UnpicklingError, match='_NotAllowListed'):
        torch.load(str(path))


def test_revert_removes_exactly_the_patch_entries():
    before = torch.serialization.get_safe_globals()
    try:
        safe_loading.revert()
        after = torch.serialization.get_safe_globals()
        assert HistoryBuffer not in after
        assert all(entry not in after for entry in safe_loading.allowed_globals())
    finally:
        safe_loading.apply()
    assert sorted(map(repr, torch.serialization.get_safe_globals())) == \
        sorted(map(repr, before))


def test_every_tool_refuses_a_checkpoint_with_a_hidden_payload(trained_toy, tmp_path):
    """A real checkpoint written by tools/train.py, with a payload under an extra key:
    each tool that reads checkpoints fails on it and the payload never runs."""
    root, work_dir, checkpoint = trained_toy
    marker = tmp_path / 'pwned'
    state = torch.load(checkpoint, map_location='cpu')
    state['meta']['note'] = _exec_payloads(marker)['getattr chain']
    evil = str(tmp_path / 'evil.pth')
    torch.save(state, evil)
    data = data_root_options(root)
    commands = {
        'test.py': ['tools/test.py', TOY_BN_CONFIG, evil, '--work-dir', str(tmp_path / 't'),
                    '--cfg-options', *data],
        'train.py --resume': ['tools/train.py', TOY_BN_CONFIG, '--resume', evil,
                              '--work-dir', str(tmp_path / 'r'), '--cfg-options', *data],
        'train.py load_from': ['tools/train.py', TOY_BN_CONFIG, '--work-dir',
                               str(tmp_path / 'l'), '--cfg-options', *data,
                               f'load_from={evil}'],
        'inspect_norms.py': ['tools/inspect_norms.py', TOY_BN_CONFIG, '--checkpoint', evil],
        'convert_checkpoint.py': ['tools/convert_checkpoint.py', evil,
                                  str(tmp_path / 'out.pth'), '--to', 'EvalBN',
                                  '--config', TOY_BN_CONFIG],
        'mabn_from_bn.py': ['tools/mabn_from_bn.py', TOY_BN_CONFIG, evil,
                            str(tmp_path / 'out2.pth'), '--shape', '1', '3', '32', '32'],
    }
    for name, args in commands.items():
        result = run_tool(args, timeout=300)
        assert result.returncode != 0, f'{name} accepted the hostile checkpoint'
        assert 'Unpickling' in result.stderr or 'weights_only' in result.stderr, \
            f'{name}: {result.stderr[-2000:]}'
        assert not marker.exists(), f'{name} ran the payload'
    assert not osp.exists(tmp_path / 'out.pth') and not osp.exists(tmp_path / 'out2.pth')


def test_url_checkpoints_load_safely_too(tmp_path):
    """mmengine's URL loader (load_from='https://...', torchvision://, Pretrained inits)
    uses torch.hub, whose default is full unpickling: the patch makes it weights_only."""
    import mmengine.runner.checkpoint as mm_checkpoint
    marker = tmp_path / 'pwned'
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'state_dict': {}, 'x': _exec_payloads(marker)['os.system']},
               str(served / 'evil.pth'))
    with pytest.raises(pickle.UnpicklingError):
        mm_checkpoint.load_url((served / 'evil.pth').as_uri(),
                               model_dir=str(tmp_path / 'cache'), map_location='cpu')
    assert not marker.exists()
    torch.save({'state_dict': {'w': torch.ones(2)}}, str(served / 'good.pth'))
    good = mm_checkpoint.load_url((served / 'good.pth').as_uri(),
                                  model_dir=str(tmp_path / 'cache'), map_location='cpu')
    assert torch.equal(good['state_dict']['w'], torch.ones(2))


def _forged_numpy_values():
    """Crafted numpy values that, if loaded, hold a forged pointer (0x4141414141414141)
    in an object array or an object field: name -> object to pickle."""
    core = getattr(np, '_core', None) or np.core
    pointer = b'AAAAAAAA'
    object_dtype = _Call(np.dtype, 'O8', False, True)  # numpy's form, without its state
    float64 = _Build(np.dtype, ('f8', False, True), (3, '<', None, None, None, -1, -1, 0))
    # a copied float64 dtype whose state gives it one object field at offset 0 (flags 63)
    with_object_field = _Build(np.dtype, ('f8', False, True),
                               (3, '|', None, ('f0', ), {'f0': (object_dtype, 0)}, 8, 1, 63))

    def array(dtype, data, shape=(1, )):
        return _Build(core.multiarray._reconstruct, (np.ndarray, (0, ), b'b'),
                      (1, shape, dtype, False, data))
    return {
        'ndarray(shape, object dtype, buffer)': _Call(np.ndarray, (1, ), object_dtype,
                                                      pointer),
        'object array from raw bytes': array(object_dtype, pointer),
        'object array of a list': array(object_dtype, [pointer]),
        'copied float64 dtype given an object field': array(with_object_field, pointer),
        'float64 array with short data': array(float64, pointer, shape=(4, )),
        'object scalar': _Call(core.multiarray.scalar, object_dtype, pointer),
    }


@pytest.mark.parametrize('name', list(_forged_numpy_values()))
def test_forged_numpy_values_are_refused_without_crashing(tmp_path, name):
    """Loaded in a subprocess, so that a segfault fails the test instead of killing it;
    the value is also touched, as training would touch a seed or a logged value."""
    path = tmp_path / 'forged.pth'
    torch.save({'state_dict': {}, 'meta': {'seed': _forged_numpy_values()[name]}},
               str(path))
    code = ('import sys, torch, mmdet_bnplug\n'
            f'ckpt = torch.load({str(path)!r})\n'
            'print(repr(ckpt["meta"]["seed"]))\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr[-2000:])
    assert 'UnpicklingError' in result.stderr and 'refused' in result.stderr, \
        result.stderr[-2000:]


def test_numpy_values_of_every_plain_dtype_load_exactly(tmp_path):
    """The forms mmengine's checkpoints use still load: arrays (C and Fortran order,
    empty, big-endian) and scalars of every accepted dtype; arrays save again as plain
    numpy arrays (the file names numpy's classes, none of the plugin's)."""
    arrays = [np.arange(6).astype(np.dtype(code)).reshape(2, 3)
              for code in safe_loading.NUMERIC_CODES]
    arrays += [np.asfortranarray(np.arange(6.).reshape(2, 3)), np.zeros((0, 3)),
               np.arange(4, dtype='>f8'), np.array(3.5)]
    scalars = [np.dtype(code).type(1) for code in safe_loading.NUMERIC_CODES]
    path = tmp_path / 'values.pth'
    torch.save({'arrays': arrays, 'scalars': scalars}, str(path))
    loaded = torch.load(str(path))
    for got, want in zip(loaded['arrays'], arrays):
        plain = pickle.loads(pickle.dumps(want))  # numpy's own (native byte order)
        assert isinstance(got, np.ndarray) and got.dtype == plain.dtype
        assert got.shape == want.shape and np.array_equal(got, want)
        assert got.flags.f_contiguous == want.flags.f_contiguous
    for got, want in zip(loaded['scalars'], scalars):
        assert type(got) is type(want) and got == want
    again = tmp_path / 'again.pth'
    torch.save(loaded, str(again))
    plain = pickle.loads(pickle.dumps(loaded['arrays']))
    assert all(type(a) is np.ndarray for a in plain)
    safe_loading.revert()
    try:  # every global the file names, none of them allow-listed now
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(again))
    finally:
        safe_loading.apply()
    assert names and all(n.startswith(('numpy.', 'builtins.bytes')) for n in names), names


def _history_buffer_with_state(state):
    """A HistoryBuffer that pickles with ``state`` (as mmengine's do: NEWOBJ + BUILD)."""
    buffer = HistoryBuffer.__new__(HistoryBuffer)
    buffer.__getstate__ = lambda: state  # the pickler asks the instance
    return buffer


def _poisoned_history_buffer():
    """A pickled HistoryBuffer whose statistics table maps 'mean' to max and registers
    'mro': mmengine's __setstate__ would write both into the class-wide table."""
    method = {name: _Call(getattr, HistoryBuffer, name) for name in ('max', 'mean')}
    return _history_buffer_with_state(dict(
        max_length=10, _log_history=np.array([1.0, 5.0]), _count_history=np.array([1, 1]),
        statistics_methods={'mean': method['max'], 'mro': method['max']}))


def test_a_poisoned_history_buffer_changes_no_class_state(tmp_path):
    HistoryBuffer()  # the class table holds its four defaults, as in any training run
    before = dict(HistoryBuffer._statistics_methods)
    path = tmp_path / 'hub.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': _poisoned_history_buffer()}},
                'then': _Call(getattr, HistoryBuffer, 'mro')}, str(path))
    with pytest.raises(pickle.UnpicklingError, match="getattr.*'mro'.*refused"):
        torch.load(str(path))
    torch.save({'loss': _poisoned_history_buffer()}, str(path))
    buffer = torch.load(str(path))['loss']
    assert HistoryBuffer._statistics_methods == before and 'mro' not in before
    assert type(buffer) is HistoryBuffer and buffer.statistics('mean') == 3.0
    assert type(buffer._log_history) is np.ndarray


@pytest.mark.parametrize('state', [
    dict(max_length=10, _log_history=np.array([1.0]), _count_history=np.array([1]),
         extra=1),
    dict(max_length=True, _log_history=np.array([1.0]), _count_history=np.array([1])),
    dict(max_length=10, _log_history=np.array([1.0, 2.0]), _count_history=np.array([1])),
    dict(max_length=10, _log_history=[1.0], _count_history=[1]),
    dict(max_length=1, _log_history=np.array([1.0, 2.0]), _count_history=np.array([1, 1])),
], ids=['unknown key', 'bool length', 'unequal lengths', 'lists', 'over max_length'])
def test_history_buffer_state_other_than_data_is_refused(tmp_path, state):
    path = tmp_path / 'hub.pth'
    torch.save({'loss': _history_buffer_with_state(state)}, str(path))
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer'):
        torch.load(str(path))


def test_history_buffer_built_with_arguments_is_refused(tmp_path):
    """``HistoryBuffer([{}], [1])`` would hold an object array of whatever was pickled."""
    path = tmp_path / 'hub.pth'
    torch.save({'loss': _Call(HistoryBuffer, [{}], [1])}, str(path))
    with pytest.raises(pickle.UnpicklingError, match=r'HistoryBuffer\(...\)'):
        torch.load(str(path))


def test_resume_never_executes_a_checkpoints_config(trained_toy, tmp_path):
    """Runner.resume executes meta['config'] (Config.fromstring); the patch drops it."""
    root, _, checkpoint = trained_toy
    marker = tmp_path / 'pwned'
    state = torch.load(checkpoint, map_location='cpu')
    state['meta']['config'] = f'_x = __import__("os").system("touch {marker}")\n'
    evil = str(tmp_path / 'evil_config.pth')
    torch.save(state, evil)
    result = run_tool(['tools/train.py', TOY_BN_CONFIG, '--resume', evil, '--work-dir',
                       str(tmp_path / 'r'), '--cfg-options', 'train_cfg.max_iters=4',
                       'train_cfg.val_interval=100', *data_root_options(root)], timeout=300)
    assert not marker.exists(), 'Runner.resume ran the config text'
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ignored the checkpoint's meta['config']" in result.stdout + result.stderr


def test_disabling_patches_refuses_unknown_names_in_any_combination(monkeypatch):
    for value in ('bogus', 'all,bogus', 'safe_loading, bogus'):
        monkeypatch.setenv(patches.DISABLE_ENV, value)
        with pytest.raises(ValueError, match="unknown patch name.*'bogus'"):
            patches.disabled_patches()
    monkeypatch.setenv(patches.DISABLE_ENV, 'all')
    assert patches.disabled_patches() == set(patches.PATCHES)


def test_revert_keeps_what_the_user_allow_listed():
    mine = HistoryBuffer  # the user's own decision (the real class), also under its name
    safe_loading.revert()
    try:
        torch.serialization.add_safe_globals([mine, _NotAllowListed])
        safe_loading.apply()
        safe_loading.revert()
        kept = torch.serialization.get_safe_globals()
        assert mine in kept and _NotAllowListed in kept
        assert not any(entry in kept for entry in safe_loading.allowed_globals())
    finally:
        keep = [e for e in torch.serialization.get_safe_globals()
                if e not in (mine, _NotAllowListed)]
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(keep)
        safe_loading.apply()


def test_a_mabn_checkpoint_resumes_bit_exact(tiny_synthetic, tmp_path):
    """A real ConvWC + MABN checkpoint from tools/train.py resumes under safe loading:
    every weight and buffer (MABN's moving averages and counters included) exactly as
    saved, the message hub's logged values too; then training continues from it."""
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner

    from conftest import SHORT
    config = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_mabn_toy.py')
    options = [*SHORT, *data_root_options(tiny_synthetic)]
    first = run_tool(['tools/train.py', config, '--work-dir', str(tmp_path / 'a'),
                      '--cfg-options', *options])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = str(tmp_path / 'a' / 'iter_4.pth')
    saved = torch.load(checkpoint, map_location='cpu')
    cfg = Config.fromfile(config)
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    cfg.work_dir = str(tmp_path / 'b')
    runner = Runner.from_cfg(cfg)
    runner._train_loop = runner.build_train_loop(runner._train_loop)
    runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    runner.param_schedulers = runner.build_param_scheduler(runner.param_schedulers)
    runner.resume(checkpoint)
    state = runner.model.state_dict()
    assert state.keys() == saved['state_dict'].keys()
    mabn_buffers = [k for k in state if k.endswith(('buffer_x2', 'buffer_gz'))]
    assert mabn_buffers, 'no MABN buffers found in the toy MABN model'
    for key, value in saved['state_dict'].items():
        assert torch.equal(state[key], value), key
    loss = runner.message_hub.get_scalar('train/loss')
    saved_loss = saved['message_hub']['log_scalars']['train/loss']
    assert type(loss) is HistoryBuffer and np.array_equal(loss.data[0], saved_loss.data[0])
    assert runner.iter == 4
    resumed = run_tool(['tools/train.py', config, '--work-dir', str(tmp_path / 'a'),
                        '--resume', checkpoint, '--cfg-options', *options,
                        'train_cfg.max_iters=6'])
    assert resumed.returncode == 0 and 'resumed epoch: 0, iter: 4' in resumed.stdout, \
        resumed.stderr[-3000:]

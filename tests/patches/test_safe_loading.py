"""Safe loading after ``import mmdet_bnplug``: mmengine's checkpoints load, and a hostile
checkpoint runs nothing, through ``torch.load`` or any of the tools."""
import os
import os.path as osp
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

import mmdet_bnplug  # noqa: F401  (applies the patch)
from conftest import TOY_BN_CONFIG, data_root_options, run_tool
from mmdet_bnplug.patches import safe_loading


class _Call:
    """Pickles as ``fn(*args)``: how a crafted checkpoint asks the unpickler to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


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
                                  str(tmp_path / 'out.pth'), '--to', 'EvalBN'],
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

"""mmengine 0.10.7 checkpoints load under torch >= 2.6's safe (weights_only) loading."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint

import mmdet_bnplug  # noqa: F401  (applies the fix)


def test_mmengine_checkpoint_with_message_hub_loads_safely(tmp_path):
    hub = MessageHub.get_instance('bnplug-compat-test')
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

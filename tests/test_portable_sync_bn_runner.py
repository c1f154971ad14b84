"""PortableSyncBN with mmengine's Runner: the ``sync_bn`` config key, and a 2-process run."""
import mmengine.model
import mmengine.runner.runner
import pytest
from mmengine.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmdet_bnplug import sync_bn_conversion
from mmdet_bnplug.norms.portable_sync_bn import PortableSyncBN


class UserSyncBN(PortableSyncBN):
    """A user's subclass of one of the package's layers: kept as well."""


def plugin_norm_classes():
    """Every BN-like layer the package registers, whatever the other modules add."""
    return sorted((cls for cls in MODELS.module_dict.values()
                   if isinstance(cls, type) and issubclass(cls, _BatchNorm)
                   and cls.__module__.startswith('mmdet_bnplug.')), key=lambda c: c.__name__)


def model_with_every_norm():
    plugin = [cls(8) for cls in plugin_norm_classes()] + [UserSyncBN(8)]
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8),
                         nn.Sequential(nn.BatchNorm1d(8), *plugin)), plugin


@pytest.mark.parametrize('convert', [mmengine.runner.runner.convert_sync_batchnorm,
                                     mmengine.model.convert_sync_batchnorm],
                         ids=['runner', 'mmengine.model'])
def test_sync_bn_key_keeps_plugin_layers_converts_the_rest(convert):
    assert PortableSyncBN in plugin_norm_classes()
    model, plugin = model_with_every_norm()
    converted = convert(model, 'torch')
    assert type(converted[1]) is nn.SyncBatchNorm
    assert type(converted[2][0]) is nn.SyncBatchNorm
    assert list(converted[2])[1:] == plugin  # the very same modules, untouched


def test_without_the_fix_mmengine_would_replace_them():
    """The trap the module guards against: mmengine's own converter."""
    model, plugin = model_with_every_norm()
    converted = sync_bn_conversion._mmengine_convert(model, 'torch')
    assert all(type(m) is nn.SyncBatchNorm for m in list(converted[2])[1:])


def test_sync_bn_key_bad_value_is_a_clear_error():
    with pytest.raises(ValueError, match='sync_bn should be "torch" or "mmcv"'):
        mmengine.runner.runner.convert_sync_batchnorm(nn.Sequential(PortableSyncBN(4)), 'apex')

"""Importing the package (directly or through a config's custom_imports) registers its
names in mmengine's root registries, where every OpenMMLab scope finds them."""
import subprocess
import sys
import warnings

import pytest
from mmengine.registry import HOOKS, MODELS

import mmdet_bnplug  # noqa: F401
from conftest import REPO, TOY_BN_CONFIG

PLUGIN_MODELS = ('MABN', 'ConvWC', 'EvalBN', 'PortableSyncBN', 'NormEval')
PLUGIN_HOOKS = ('NormEvalCheckHook', )


@pytest.mark.parametrize('registry, name', [(MODELS, n) for n in PLUGIN_MODELS]
                         + [(HOOKS, n) for n in PLUGIN_HOOKS])
def test_registered_in_root_and_resolved_from_every_scope(registry, name):
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    entry = registry.module_dict[name]
    assert entry.__module__.startswith('mmdet_bnplug.')
    for scope in (None, 'mmdet', 'mmengine'):
        with registry.switch_scope_and_registry(scope) as scoped:
            assert scoped.get(name) is entry  # nothing in mmdet shadows it


def test_custom_imports_alone_registers_everything():
    code = ('from mmengine.config import Config\n'
            'from mmengine.registry import MODELS, HOOKS\n'
            f'Config.fromfile({TOY_BN_CONFIG!r})\n'
            f'missing = [n for n in {PLUGIN_MODELS!r} if MODELS.get(n) is None]\n'
            f'missing += [n for n in {PLUGIN_HOOKS!r} if HOOKS.get(n) is None]\n'
            'assert not missing, missing\n'
            'print("ok")\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr[-2000:]



def test_mabn_compiled_cpu_step_is_built():
    """The install builds MABN's compiled CPU kernels (setup.py); without them training
    on CPU is slow on small maps, so a missing build fails here rather than passing by."""
    from mmdet_bnplug.ops import mabn as mabn_ops
    assert mabn_ops.cpu_kernels is not None, \
        'reinstall with: pip install --no-build-isolation -e .'


def test_sync_bn_compiled_cpu_kernels_are_built():
    """The install builds PortableSyncBN's compiled CPU kernels too (setup.py)."""
    from mmdet_bnplug.layers import portable_sync_bn
    assert portable_sync_bn.cpu_kernels is not None, \
        'reinstall with: pip install --no-build-isolation -e .'


def test_mabn_without_compiled_step_warns_once(monkeypatch):
    import torch

    from mmdet_bnplug.layers import mabn
    from mmdet_bnplug.ops import mabn as mabn_ops
    monkeypatch.setattr(mabn_ops, 'cpu_kernels', None)  # as without the build
    mabn_ops._warn_not_compiled.cache_clear()
    layer = mabn.MABN(2)
    with mabn_ops.pytorch_on_cpu():
        with pytest.warns(UserWarning, match='compiled CPU step .* is not built'):
            layer(torch.randn(2, 2, 3, 3))
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            layer(torch.randn(2, 2, 3, 3))
    assert layer.num_batches_tracked.item() == 2

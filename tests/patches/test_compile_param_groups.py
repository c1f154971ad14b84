"""mmengine's ``compile`` option on the toy RetinaNet with each norm layer of the package
(mmdet_bnplug.patches.compile_param_groups): training runs, every norm layer is inside
the compiled graphs (not left to graph breaks), and the first iteration's loss equals
eager's. Backend ``aot_eager`` (dynamo and AOTAutograd, the ops' fake implementations and
functionalisation, no code generation, which the layer tests cover with inductor)."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.optim import OptimWrapper
from torch._dynamo import register_backend
from torch._dynamo.backends.debugging import aot_eager

from conftest import REPO, SHORT, data_root_options
from mmdet_bnplug.patches.compile_param_groups import plain_param_groups
from run_config import build_runner

TOY = osp.join(REPO, 'configs', 'toy')
CONFIGS = {'BN': 'retinanet_r18_fpn_bn_toy.py', 'ConvWC+MABN': 'retinanet_r18_fpn_mabn_toy.py',
           'EvalBN': 'retinanet_r18_fpn_evalbn_toy.py',
           'PortableSyncBN': 'retinanet_r18_fpn_syncbn_toy.py'}
TRACED = set()  # module paths that dynamo put into a graph


@register_backend(name='bnplug_recording_aot_eager')
def recording_aot_eager(gm, example_inputs, **kwargs):
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get('nn_module_stack') or {}).values():
            TRACED.add(path.removeprefix("L['self']").lstrip('.'))
    return aot_eager(gm, example_inputs, **kwargs)


def test_plain_param_groups_keeps_items_and_parameter_lists():
    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer = torch.optim.SGD([ConfigDict(params=params, lr=0.1)], lr=0.1)
    plain_param_groups(OptimWrapper(optimizer))
    (group, ) = optimizer.param_groups
    assert type(group) is dict and group['params'][0] is params[0] and group['lr'] == 0.1


def first_loss(config, data_root, work_dir, compile_cfg):
    cfg = Config.fromfile(osp.join(TOY, config))
    options = (kv.split('=', 1) for kv in SHORT + data_root_options(data_root))
    cfg.merge_from_dict({k: DictAction._parse_iterable(v) for k, v in options})  # as the CLI
    cfg.merge_from_dict({'train_cfg.max_iters': 1, 'train_cfg.val_begin': 2,
                         'default_hooks.checkpoint.interval': 2})
    cfg.update(load_from=None, work_dir=work_dir, randomness=dict(seed=0), compile=compile_cfg)
    runner = build_runner(cfg)
    runner.train()
    norms = [name for name, m in runner.model.named_modules()
             if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm))]
    return runner.message_hub.get_scalar('train/loss').current(), norms


@pytest.mark.parametrize('norm', list(CONFIGS))
def test_toy_trains_under_mmengine_compile(norm, tiny_synthetic, tmp_path):
    eager, norms = first_loss(CONFIGS[norm], tiny_synthetic, str(tmp_path / 'eager'), None)
    torch._dynamo.reset()
    TRACED.clear()
    compiled, _ = first_loss(CONFIGS[norm], tiny_synthetic, str(tmp_path / 'compiled'),
                             dict(backend='bnplug_recording_aot_eager'))
    assert len(norms) == 20
    assert not [name for name in norms if name not in TRACED], 'norm layers outside graphs'
    assert compiled == pytest.approx(eager, rel=1e-4)

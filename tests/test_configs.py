"""Every shipped config loads (mmdet:: inheritance included) and its model builds."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

from conftest import REPO
from run_config import check_norm_types

CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True))


@pytest.mark.parametrize('path', CONFIGS, ids=[osp.relpath(p, REPO) for p in CONFIGS])
def test_config_loads_and_model_builds(path):
    register_all_modules(init_default_scope=True)
    cfg = Config.fromfile(path)
    assert 'mmdet_bnplug' in cfg.custom_imports['imports']
    check_norm_types(cfg.model)
    model = MODELS.build(cfg.model)
    model.eval()
    size = 128 if '/toy/' in path else 256
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, size, size))
    assert len(feats) == cfg.model.neck.num_outs

"""The tools' config loading: mmdet's argument conventions and clear errors for bad input."""
import argparse
import os.path as osp

import pytest
import torch.distributed as dist
from mmengine.config import Config

from conftest import TOY_BN_CONFIG, run_tool
from dist_utils import run_distributed
from run_config import (
    add_common_args,
    check_datasets,
    check_norm_types,
    close_distributed,
    load_config,
)


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    return add_common_args(parser).parse_args(argv)


def test_cfg_options_launcher_and_default_work_dir():
    cfg = load_config(parse([TOY_BN_CONFIG, '--cfg-options', 'train_cfg.max_iters=7',
                             'model.backbone.norm_cfg.type=GN',
                             'model.backbone.norm_cfg.num_groups=8']))
    assert cfg.train_cfg.max_iters == 7
    assert cfg.model.backbone.norm_cfg == dict(type='GN', requires_grad=True, num_groups=8)
    assert cfg.launcher == 'none'
    assert cfg.work_dir == osp.join('./work_dirs', 'retinanet_r18_fpn_bn_toy')
    assert load_config(parse([TOY_BN_CONFIG, '--work-dir', 'x/y'])).work_dir == 'x/y'


def test_missing_config_file_is_named():
    with pytest.raises(FileNotFoundError, match='config file not found.*nope.py'):
        load_config(parse(['configs/nope.py']))


def test_unknown_norm_type_names_the_key_and_the_choices():
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='BNN')),
                                 neck=dict(norm_cfg=dict(type='GN', num_groups=4)))))
    with pytest.raises(KeyError) as info:
        check_norm_types(cfg.model)
    message = str(info.value)
    assert "model.backbone.norm_cfg.type='BNN'" in message
    assert 'Did you mean' in message and 'SyncBN' in message and 'GN' in message


def test_registered_norm_types_pass():
    check_norm_types(dict(backbone=dict(norm_cfg=dict(type='BN')),
                          head=dict(norm_cfg=dict(type='GN', num_groups=32)),
                          other=[dict(norm_cfg=dict(type='SyncBN'))]))


def test_missing_synthetic_dataset_says_how_to_generate_it(tmp_path):
    cfg = Config.fromfile(TOY_BN_CONFIG)
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'synthetic') + '/'
    with pytest.raises(FileNotFoundError,
                       match=r'train_dataloader\.dataset.*tools/make_synthetic\.py'):
        check_datasets(cfg, ['train_dataloader'])


def test_missing_coco_says_where_it_belongs(tmp_path):
    cfg = Config(dict(test_dataloader=dict(dataset=dict(
        type='RepeatDataset', times=2,
        dataset=dict(data_root=str(tmp_path / 'coco') + '/',
                     ann_file='annotations/instances_val2017.json')))))
    with pytest.raises(FileNotFoundError, match='download COCO 2017'):
        check_datasets(cfg, ['test_dataloader'])


def test_train_tool_reports_bad_input_without_building_anything(tmp_path):
    result = run_tool(['tools/train.py', TOY_BN_CONFIG, '--work-dir', str(tmp_path),
                       '--cfg-options', 'model.backbone.norm_cfg.type=MABNX'], timeout=300)
    assert result.returncode != 0
    assert "model.backbone.norm_cfg.type='MABNX' is not a registered norm layer" in \
        result.stderr
    result = run_tool(['tools/test.py', TOY_BN_CONFIG, str(tmp_path / 'missing.pth')],
                      timeout=300)
    assert result.returncode != 0 and 'checkpoint file not found' in result.stderr


def _close_and_report(rank, world_size):
    close_distributed()
    return dist.is_initialized()


def test_close_distributed_destroys_the_process_group():
    """The tools close the group after a distributed run (else a gloo rank can abort at
    interpreter exit); without a group it does nothing."""
    assert run_distributed(_close_and_report, 2) == [False, False]
    close_distributed()

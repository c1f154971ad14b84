"""Smoke test of the detection small-batch study (benchmarks/det_small_batch_study.py):
the script, run as a subprocess on its --tiny setting (a 16-image dataset, a few
iterations), trains and evaluates one MABN run through tools/train.py and tools/test.py
and writes its records, markdown table and plots. Structure only: no timing, no accuracy.
"""
import json
import os.path as osp
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TYPES = dict(norm=str, where=str, images_per_gpu=int, processes=int, seed=int, iters=int,
             bbox_mAP=float, bbox_mAP_50=float)


def _run(tmp_path, *extra):
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'benchmarks.det_small_batch_study', '--tiny',
           '--only', 'mabn2', '--seeds', '0', '--threads', '1',
           '--data-root', str(tmp_path / 'data'),
           '--work-root', str(tmp_path / 'work_dirs'), '--out-json', str(out / 'r.json'),
           '--out-md', str(out / 'r.md'), '--img-dir', str(out / 'img'), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_tiny_study_writes_records_table_and_plots(tmp_path):
    out, _ = _run(tmp_path)
    records = json.loads((out / 'r.json').read_text())
    assert isinstance(records, list) and len(records) == 1
    rec = records[0]
    for key, typ in TYPES.items():
        assert isinstance(rec[key], typ), (key, rec[key])
    assert (rec['norm'], rec['where'], rec['images_per_gpu'], rec['processes'],
            rec['seed']) == ('MABN', 'backbone', 2, 1, 0)
    assert 0.0 <= rec['bbox_mAP'] <= 1.0 and 0.0 <= rec['bbox_mAP_50'] <= 1.0
    assert rec['curve']['iter'] and len(rec['curve']['loss']) == len(rec['curve']['iter'])
    md = (out / 'r.md').read_text()
    assert '| row | norm | where |' in md and '| mabn2 | MABN | backbone |' in md
    assert (out / 'img' / 'det_small_batch_study_tiny_map.png').stat().st_size > 0
    assert (out / 'img' / 'det_small_batch_study_tiny_curves.png').stat().st_size > 0
    # each run in its own work dir, the run config written there
    assert osp.isfile(tmp_path / 'work_dirs' / 'adamw' / 'mabn2_s0' / 'mabn2_s0.py')
    # resumable: the recorded run is skipped on a second invocation (report only)
    _, stdout = _run(tmp_path)
    assert 'recorded, skipped' in stdout
    assert len(json.loads((out / 'r.json').read_text())) == 1


def _mabn_args(row_key, ref_iters=600):
    """MABN settings the study writes into a row's run config, parsed back."""
    from benchmarks import det_small_batch_study as study
    args = study.parse_args(['--ref-iters', str(ref_iters)])
    row = study.ROWS[row_key]
    sched = study.schedule(args, row['images_per_gpu'], row['processes'])
    return sched, study.mabn_parts(row, sched)


def test_mabn_recipes_of_the_rows():
    sched, model = _mabn_args('mabn2')
    assert (sched['iters'], sched['warmup']) == (2400, 400)
    norm = model['backbone']['norm_cfg']
    assert (norm['buffer_size'], norm['warmup_iters'], norm['renorm_iters']) == (16, 400, 480)
    assert 'neck' not in model and 'bbox_head' not in model
    # the late start: 4x the learning-rate warm-up, renorm at least as late
    norm = _mabn_args('mabn2_late')[1]['backbone']['norm_cfg']
    assert (norm['warmup_iters'], norm['renorm_iters']) == (1600, 1600)
    # batch statistics throughout: the warm-up outlasts the schedule
    norm = _mabn_args('mabn2_batch')[1]['backbone']['norm_cfg']
    assert norm['warmup_iters'] == 2401 and norm['warmup_iters'] > sched['iters']
    # the shared head counts 4 layer steps per iteration (one per FPN level)
    model = _mabn_args('mabn2_all_late')[1]
    head = model['bbox_head']['norm_cfg']
    assert model['neck']['norm_cfg']['warmup_iters'] == 1600
    assert (head['buffer_size'], head['warmup_iters']) == (64, 6400)
    # a per-level head: each level's layer steps once per iteration, as the backbone's
    model = _run_config('mabn2_all_lvl_late').model
    assert model.bbox_head.type == 'LevelNormRetinaHead'
    assert model.bbox_head.norm_cfg == model.backbone.norm_cfg == model.neck.norm_cfg
    assert model.bbox_head.norm_cfg.warmup_iters == 1600


def test_goal_lines_compare_every_mabn_row_with_bn():
    from benchmarks.det_small_batch_study import goal_lines
    summary = {'bn8': (0.44, 0.03, 0.40, 0.46, 3), 'bn2': (0.37, 0.02, 0.36, 0.40, 3),
               'mabn2': (0.37, 0.05, 0.32, 0.43, 3), 'mabn2_late': (0.50, 0.02, 0.48, 0.51, 2),
               'gn2': (0.60, 0.01, 0.60, 0.61, 2)}
    lines = goal_lines(summary)
    assert len(lines) == 2  # the two MABN rows, not GN
    assert lines[0].startswith('mabn2 minus bn2: +0.000') and 'overlap' in lines[0]
    assert 'every MABN seed above every BN seed' in lines[1]
    assert 'mabn2_late / bn8: 1.14' in lines[1]
    assert goal_lines({'mabn2': summary['mabn2']}) == []  # nothing to compare with


def test_toy_mabn_configs_are_the_study_rows():
    """configs/toy's MABN-at-2 configs reproduce the study's mabn2_late (the recipe) and
    mabn2_all_lvl_late runs (norms, head, schedule, learning rate) with tools/train.py
    alone."""
    from mmengine.config import Config

    from benchmarks import det_small_batch_study as study
    for config, row in (('retinanet_r18_fpn_mabn_2img_toy.py', 'mabn2_late'),
                        ('retinanet_r18_fpn_mabn_2img_all_toy.py', 'mabn2_all_lvl_late')):
        cfg = Config.fromfile(osp.join(REPO, 'configs', 'toy', config))
        sched, model = _mabn_args(row)
        for part in ('backbone', 'neck', 'bbox_head'):
            got = cfg.model[part].get('norm_cfg')
            assert (got and got.to_dict()) == model.get(part, {}).get('norm_cfg'), \
                (config, part)
        assert cfg.train_cfg.max_iters == sched['iters']
        assert cfg.train_dataloader.batch_size == 2
        assert cfg.optim_wrapper.optimizer.lr == sched['lr']
        warmup, steps = cfg.param_scheduler
        assert warmup.end == sched['warmup'] and steps.milestones == sched['milestones']
        assert cfg.model.bbox_head.type == study.ROWS[row].get('head', {}).get(
            'type', 'RetinaHead'), config


def _run_config(row_key):
    """The run config the study writes for a row (seed 0), parsed."""
    from mmengine.config import Config

    from benchmarks import det_small_batch_study as study
    args = study.parse_args([])
    row = study.ROWS[row_key]
    sched = study.schedule(args, row['images_per_gpu'], row['processes'])
    return Config.fromstring(study.run_config_text(args, row, 0, sched), '.py')


def test_rows_override_the_backbones_conv_and_norm():
    for key, conv, norm in (('bn2_convwc', 'ConvWC', 'BN'), ('gn2', None, 'GN'),
                            ('bn2_m002', None, 'BN'), ('bn2', None, 'BN')):
        backbone = _run_config(key).model.backbone
        assert (backbone.get('conv_cfg') or {}).get('type') == conv, key
        assert backbone.norm_cfg.type == norm, key
    assert _run_config('bn2').model.backbone.norm_cfg.get('momentum') is None  # BN's default
    assert _run_config('bn2_m002').model.backbone.norm_cfg.momentum == 0.02

"""Detection small-batch study: the toy RetinaNet R18-FPN from scratch at 2 images per
batch with each norm layer, against BN at 8, through the project's own tools.

    python -m benchmarks.det_small_batch_study [--only ROW ...] [--seeds 0 1 2]
        [--recipe adamw|sgd] [--ref-iters N] [--diagnose] [--tiny] [--dry-run]

Each run is ``tools/train.py`` (or ``tools/dist_train.sh CONFIG 4`` for PortableSyncBN)
then ``tools/test.py`` as subprocesses, in its own work dir under
``work_dirs/det_study/`` (``--work-root``), on a config the script writes there: it
inherits a ``configs/toy/`` config and sets the study's batch, schedule and seed. Every
run sees the same number of training images: ``--ref-iters`` iterations at a global
batch of 8, i.e. 4x as many at 2 (warm-up and decay steps scaled the same way, learning
rate scaled linearly with the batch). EvalBN fine-tunes the BN-at-8 run of the same seed.

Resumable: a run whose record is already in ``--out-json`` (same row, seed, recipe and
iterations) is skipped; each record is written (atomically) as soon as its run has been
evaluated, and the markdown table and plots are rewritten from the json after each run.
``--diagnose`` runs the MABN ablations instead (``DIAG_ROWS``, diagnostic layer
``benchmarks/det_study/diag_layers.py``) into ``--diag-json``. Design, results and
limits: ``docs/det_small_batch_study.md``.
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import re
import shutil
import statistics
import subprocess
import sys
import time

from benchmarks.bench_utils import pyplot, save_figure, write_text
from mmdet_bnplug.testing.gloo import free_port

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY = osp.join(ROOT, 'configs', 'toy')
REF_BATCH = 8
KEYS = ('norm', 'where', 'images_per_gpu', 'processes', 'seed', 'iters', 'bbox_mAP',
        'bbox_mAP_50')

# per-level statistics in RetinaNet's head (mmdet_bnplug.models.LevelNormRetinaHead)
LEVEL_HEAD = dict(type='LevelNormRetinaHead')
# row key -> what it runs. 'config' is the configs/toy/ file the run config inherits.
ROWS = {
    'bn8': dict(norm='BN', where='backbone', images_per_gpu=8, processes=1,
                config='retinanet_r18_fpn_bn_toy.py', label='BN, 8 images (reference)'),
    'bn2': dict(norm='BN', where='backbone', images_per_gpu=2, processes=1,
                config='retinanet_r18_fpn_bn_toy.py', label='BN, 2 images'),
    'bn2_m002': dict(norm='BN', where='backbone', images_per_gpu=2, processes=1,
                     config='retinanet_r18_fpn_bn_toy.py',
                     norm_cfg=dict(type='BN', momentum=0.02, requires_grad=True),
                     label="BN, 2 images, running statistics at MABN's momentum 0.02"),
    'bn2_convwc': dict(norm='BN', where='backbone', images_per_gpu=2, processes=1,
                       config='retinanet_r18_fpn_bn_toy.py', conv_cfg=dict(type='ConvWC'),
                       label='ConvWC + BN, 2 images'),
    'mabn2': dict(norm='MABN', where='backbone', images_per_gpu=2, processes=1,
                  config='retinanet_r18_fpn_mabn_2img_toy.py',
                  label='ConvWC + MABN, 2 images'),
    'mabn2_all': dict(norm='MABN', where='backbone+neck+head', images_per_gpu=2,
                      processes=1, config='retinanet_r18_fpn_mabn_2img_toy.py',
                      label='ConvWC + MABN in backbone, FPN and shared head, 2 images'),
    'mabn2_neck': dict(norm='MABN', where='backbone+neck', images_per_gpu=2, processes=1,
                       config='retinanet_r18_fpn_mabn_2img_toy.py',
                       label='ConvWC + MABN in backbone and FPN, 2 images'),
    'mabn2_late': dict(norm='MABN', where='backbone', images_per_gpu=2, processes=1,
                       config='retinanet_r18_fpn_mabn_2img_toy.py', warmup_scale=4,
                       label='ConvWC + MABN, 2 images, moving averages from 4x the lr '
                             'warm-up'),
    'mabn2_neck_late': dict(norm='MABN', where='backbone+neck', images_per_gpu=2,
                            processes=1, config='retinanet_r18_fpn_mabn_2img_toy.py',
                            warmup_scale=4,
                            label='ConvWC + MABN in backbone and FPN, 2 images, moving '
                                  'averages from 4x the lr warm-up'),
    'mabn2_all_late': dict(norm='MABN', where='backbone+neck+head', images_per_gpu=2,
                           processes=1, config='retinanet_r18_fpn_mabn_2img_toy.py',
                           warmup_scale=4,
                           label='ConvWC + MABN in backbone, FPN and shared head, 2 images, '
                                 'moving averages from 4x the lr warm-up'),
    'mabn2_all_lvl': dict(norm='MABN', where='backbone+neck+head/level', images_per_gpu=2,
                          processes=1, config='retinanet_r18_fpn_mabn_2img_toy.py',
                          head=LEVEL_HEAD,
                          label='ConvWC + MABN in backbone, FPN and head, per-level head '
                                'statistics, 2 images'),
    'mabn2_all_lvl_late': dict(norm='MABN', where='backbone+neck+head/level',
                               images_per_gpu=2, processes=1,
                               config='retinanet_r18_fpn_mabn_2img_toy.py', warmup_scale=4,
                               head=LEVEL_HEAD,
                               label='ConvWC + MABN in backbone, FPN and head, per-level '
                                     'head statistics, 2 images, moving averages from 4x '
                                     'the lr warm-up'),
    'mabn2_batch': dict(norm='MABN', where='backbone', images_per_gpu=2, processes=1,
                        config='retinanet_r18_fpn_mabn_2img_toy.py', sma=False,
                        label='ConvWC + MABN, 2 images, batch statistics throughout '
                              '(the moving averages never start)'),
    **{f'bn{n}_head{lvl}': dict(
        norm='BN', where='backbone+head' + ('/level' if lvl else ''), images_per_gpu=n,
        processes=1, config='retinanet_r18_fpn_bn_toy.py',
        head=dict(LEVEL_HEAD if lvl else {}, norm_cfg=dict(type='BN', requires_grad=True)),
        label=f"BN, {n} images, BN in the head, {'per-level' if lvl else 'shared'} "
              'statistics') for n in (2, 8) for lvl in ('', '_lvl')},
    'gn2': dict(norm='GN', where='backbone', images_per_gpu=2, processes=1,
                config='retinanet_r18_fpn_bn_toy.py',
                norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
                label='GN (32 groups), 2 images'),
    'syncbn4x2': dict(norm='PortableSyncBN', where='backbone', images_per_gpu=2,
                      processes=4, config='retinanet_r18_fpn_syncbn_toy.py',
                      custom_hooks=[],
                      label="PortableSyncBN, 4 gloo processes x 2 images, each rank's loss "
                            "over its own positive anchors"),
    'syncbn4x2_global': dict(norm='PortableSyncBN', where='backbone', images_per_gpu=2,
                             processes=4, config='retinanet_r18_fpn_syncbn_toy.py',
                             label='PortableSyncBN, 4 gloo processes x 2 images, loss '
                                   'normalisers global (GlobalLossNormHook)'),
    'evalbn2': dict(norm='EvalBN', where='backbone', images_per_gpu=2, processes=1,
                    config='retinanet_r18_fpn_evalbn_toy.py', finetune_from='bn8',
                    label='EvalBN, fine-tuned at 2 from BN at 8'),
}
DEFAULT_SEEDS = {'bn8': 3, 'bn2': 3, 'mabn2': 3, 'mabn2_late': 3}  # others: 2
# the MABN ablations (--diagnose): MABNDiag switches, ConvWC or not, warm-up length
DIAG_ROWS = {
    'full': dict(label='MABN as the spec (all parts)'),
    'no_bwd_sma': dict(bwd_sma=False, label='backward SMA off'),
    'no_fwd_sma': dict(fwd_sma=False, label='forward SMA off'),
    'no_renorm': dict(renorm=False, label='renorm off'),
    'no_convwc': dict(convwc=False, label='plain conv instead of ConvWC'),
    'batch_stats': dict(fwd_sma=False, bwd_sma=False, renorm=False,
                        label='all parts off (BN without centring)'),
    'warmup_x4': dict(warmup_scale=4, label='warmup_iters 4x the lr warm-up'),
    'lr_quarter': dict(lr_scale=0.25, label='learning rate / 4'),
}
TINY = dict(ref_iters=2, data_root='data/synthetic_tiny', num_train=16, num_val=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', nargs='+', metavar='ROW', help=f'rows to run: {list(ROWS)} '
                   f'(with --diagnose: {list(DIAG_ROWS)})')
    p.add_argument('--seeds', nargs='+', type=int,
                   help='seeds (default: 0 1 2 for bn8, bn2, mabn2, mabn2_late; 0 1 for the '
                   'rest)')
    p.add_argument('--recipe', choices=['adamw', 'sgd'], default='adamw',
                   help='adamw: the toy recipe (lr 1e-3 at batch 8); sgd: momentum 0.9, '
                   'lr 0.02 at batch 8, weight decay 1e-4; both scaled linearly')
    p.add_argument('--ref-iters', type=int, default=600,
                   help='iterations at a global batch of 8 (x4 at batch 2)')
    p.add_argument('--warmup-frac', type=float, default=1 / 6,
                   help='linear lr warm-up, fraction of the schedule')
    p.add_argument('--finetune-frac', type=float, default=0.25,
                   help="EvalBN's fine-tuning, in images, as a fraction of the budget")
    p.add_argument('--diagnose', action='store_true', help='run the MABN ablations')
    p.add_argument('--diag-iters', type=int, default=None,
                   help='--diagnose: iterations at batch 8 (default --ref-iters)')
    p.add_argument('--threads', type=int, default=2, help='torch threads per run')
    p.add_argument('--data-root', default='data/synthetic')
    p.add_argument('--work-root', default='work_dirs/det_study')
    p.add_argument('--out-json', default='docs/det_small_batch_study_results.json')
    p.add_argument('--out-md', default='docs/det_small_batch_study_results.md')
    p.add_argument('--diag-json', default='docs/det_small_batch_study_diagnosis.json')
    p.add_argument('--img-dir', default='docs/img')
    p.add_argument('--python', default=sys.executable)
    p.add_argument('--tiny', action='store_true',
                   help='smoke-test size: a tiny dataset, a few iterations')
    p.add_argument('--keep-checkpoints', action='store_true')
    p.add_argument('--dry-run', action='store_true', help='print the runs, run nothing')
    p.add_argument('--report-only', action='store_true',
                   help='rewrite markdown and plots from the json')
    args = p.parse_args(argv)
    if args.tiny:
        args.ref_iters = TINY['ref_iters']
        args.data_root = TINY['data_root'] if args.data_root == 'data/synthetic' else \
            args.data_root
    rows = DIAG_ROWS if args.diagnose else ROWS
    for key in args.only or []:
        if key not in rows:
            p.error(f'unknown row {key!r}; choose from {list(rows)}')
    return args


# ----------------------------------------------------------------------------- schedule

def schedule(args, images_per_gpu, processes, ref_iters=None):
    """Iterations, warm-up, milestones, lr for a global batch, same images as the ref."""
    ref_iters = ref_iters or args.ref_iters
    batch = images_per_gpu * processes
    scale = REF_BATCH / batch
    iters = int(round(ref_iters * scale))
    warmup = max(1, int(round(ref_iters * args.warmup_frac * scale)))
    base_lr = 1e-3 if args.recipe == 'adamw' else 0.02
    return dict(iters=iters, warmup=warmup, lr=base_lr * batch / REF_BATCH,
                milestones=[int(iters * 0.75), int(iters * 0.9)])


def optimizer_text(args, lr):
    if args.recipe == 'adamw':
        opt = f"dict(type='AdamW', lr={lr!r}, weight_decay=0.05)"
    else:
        opt = f"dict(_delete_=True, type='SGD', lr={lr!r}, momentum=0.9, weight_decay=1e-4)"
    return (f"optim_wrapper = dict(optimizer={opt},\n"
            "    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),\n"
            "    clip_grad=dict(max_norm=10, norm_type=2))\n")


def data_text(root):
    root = root.rstrip('/') + '/'
    return (f"data_root = {root!r}\n"
            f"val_dataloader = dict(dataset=dict(data_root={root!r}))\n"
            f"test_dataloader = val_dataloader\n"
            f"val_evaluator = dict(ann_file={root + 'annotations/val.json'!r})\n"
            f"test_evaluator = val_evaluator\n")


def run_config_text(args, row, seed, sched, load_from=None, diag=None):
    """A config file for one run: inherits configs/toy/<row config>, sets the study's
    batch, schedule, seed, data, logging."""
    cfg = osp.join(TOY, row['config'])
    iters, warmup = sched['iters'], sched['warmup']
    log_interval = max(1, iters // 60)
    lines = [f"_base_ = [{cfg!r}]\n"]
    is_diag = bool(row.get('_diag'))
    imports = ['mmdet_bnplug'] + (['benchmarks.det_study.diag_layers'] if is_diag else [])
    lines.append(f"custom_imports = dict(imports={imports!r}, allow_failed_imports=False)\n")
    lines.append(data_text(args.data_root))
    lines.append(f"train_dataloader = dict(batch_size={row['images_per_gpu']}, "
                 f"dataset=dict(data_root={args.data_root.rstrip('/') + '/'!r}))\n")
    model = mabn_parts(row, sched, diag) if row['norm'] == 'MABN' else {}
    backbone = {k: row[k] for k in ('conv_cfg', 'norm_cfg') if k in row}
    if backbone:
        model['backbone'] = backbone
    if 'head' in row:  # the row's head settings over the recipe's
        model['bbox_head'] = dict(model.get('bbox_head', {}), **row['head'])
    if model:
        lines.append(f"model = {model!r}\n")
    lines.append(f"max_iters = {iters}\n"
                 f"train_cfg = dict(type='IterBasedTrainLoop', max_iters={iters}, "
                 f"val_interval={iters + 1})\n")  # evaluated by tools/test.py
    lines.append(optimizer_text(args, sched['lr']))
    lines.append("param_scheduler = [\n"
                 f"    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, "
                 f"end={warmup}),\n"
                 f"    dict(type='MultiStepLR', by_epoch=False, begin=0, end={iters},\n"
                 f"         milestones={sched['milestones']!r}, gamma=0.1)]\n")
    lines.append(f"default_hooks = dict(logger=dict(interval={log_interval}),\n"
                 f"    checkpoint=dict(interval={iters}, max_keep_ckpts=1))\n")
    if 'custom_hooks' in row:  # the row's own (an empty list: none of its config's)
        lines.append(f"custom_hooks = {row['custom_hooks']!r}\n")
    elif is_diag:
        lines.append("custom_hooks = [dict(type='StalenessHook')]\n")
    elif row['norm'] == 'EvalBN':
        lines.append("custom_hooks = [dict(type='NormEvalCheckHook', interval=50, "
                     "action='error')]\n")
    lines.append(f"load_from = {load_from!r}\n")
    lines.append(f"randomness = dict(seed={seed})\n")
    return ''.join(lines)


def mabn_parts(row, sched, diag=None):
    """MABN recipe for detection at 2 images per GPU (docs/det_small_batch_study.md), as
    the run config's ``model`` parts: buffer_size = 32 / images per GPU (paper's rule),
    warmup_iters = the lr warm-up, renorm_iters = 20% of the schedule (a row's or
    ablation's ``warmup_scale``: warmup_iters that many times the lr warm-up, renorm_iters
    at least as long; a row's ``sma=False``: warmup_iters past the schedule, batch
    statistics throughout). In a shared head (one layer called once per FPN level, 4
    levels) counters and buffers are 4x as long in layer steps; in a per-level head (a
    row's ``head`` type ``LevelNorm...``) each level's layer is called once per
    iteration, as in the backbone."""
    diag = dict(diag or {})
    warmup_scale = diag.pop('warmup_scale', row.get('warmup_scale', 1))
    convwc = diag.pop('convwc', True)
    diag.pop('label', None)
    buffer_size = max(1, 32 // row['images_per_gpu'])
    # sma=False: warm-up (batch statistics) until after the last iteration
    warmup = sched['warmup'] * warmup_scale if row.get('sma', True) else sched['iters'] + 1
    renorm = max(warmup, int(sched['iters'] * 0.2))
    ntype = 'MABNDiag' if row.get('_diag') else 'MABN'

    def norm(scale=1):
        d = dict(type=ntype, requires_grad=True, buffer_size=buffer_size * scale,
                 warmup_iters=warmup * scale, renorm_iters=renorm * scale, r_max=5.0,
                 momentum=0.02)
        if ntype == 'MABNDiag':
            d.update(diag)
        return d

    conv = dict(type='ConvWC') if convwc else None
    parts = dict(backbone=dict(conv_cfg=conv, norm_cfg=norm(), norm_eval=False))
    if 'neck' in row['where']:
        parts['neck'] = dict(conv_cfg=conv, norm_cfg=norm())
    if 'head' in row['where']:
        per_level = row.get('head', {}).get('type', '').startswith('LevelNorm')
        parts['bbox_head'] = dict(conv_cfg=conv, norm_cfg=norm(1 if per_level else 4))
    return parts


# ----------------------------------------------------------------------------- running

def run(cmd, env, log_path):
    with open(log_path, 'w') as log:
        log.write(' '.join(cmd) + '\n')
        log.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f'{cmd[1:3]} failed ({proc.returncode}); log {log_path}:\n{tail}')


def read_curve(work_dir):
    """Training loss and grad_norm per logged iteration, from mmengine's scalars.json."""
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    curve = dict(iter=[], loss=[], grad_norm=[], lr=[])
    extra = {}
    if not files:
        return curve
    with open(files[-1]) as f:
        for line in f:
            rec = json.loads(line)
            if 'loss' not in rec:
                continue
            curve['iter'].append(rec.get('iter', rec.get('step')))
            curve['loss'].append(rec['loss'])
            curve['grad_norm'].append(rec.get('grad_norm'))
            curve['lr'].append(rec.get('lr'))
            for k in ('stale_fwd', 'stale_bwd', 'r_dev'):
                if k in rec:
                    extra.setdefault(k, []).append(rec[k])
    curve.update(extra)
    return curve


def read_metrics(log_path):
    with open(log_path) as f:
        text = f.read()
    found = {}
    if 'The testing results of the whole dataset is empty' in text:
        return dict(bbox_mAP=0.0, bbox_mAP_50=0.0)  # no detection above score_thr
    for key in ('bbox_mAP', 'bbox_mAP_50'):
        m = re.findall(r'coco/' + key + r': (-?[0-9.]+)', text)
        if not m:
            raise RuntimeError(f'no coco/{key} in {log_path}')
        found[key] = float(m[-1])
    return found


def write_json(path, data):
    write_text(path, json.dumps(data, indent=1) + '\n')


def load_json(path):
    if osp.isfile(path):
        with open(path) as f:
            return json.load(f)
    return []


def one_run(args, key, row, seed, sched, run_dir, load_from=None, diag=None):
    """Train and evaluate one run; return its record."""
    os.makedirs(run_dir, exist_ok=True)
    cfg_path = osp.join(run_dir, f'{key}_s{seed}.py')
    with open(cfg_path, 'w') as f:
        f.write(run_config_text(args, row, seed, sched, load_from, diag))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    procs = row['processes']
    env['OMP_NUM_THREADS'] = str(max(1, args.threads // procs))
    train_dir = osp.join(run_dir, 'train')
    if osp.isdir(train_dir):
        shutil.rmtree(train_dir)  # an interrupted earlier attempt: start afresh
    t0 = time.time()
    if procs > 1:
        env.update(PYTHON=args.python, PORT=str(free_port()))
        cmd = ['bash', osp.join(ROOT, 'tools', 'dist_train.sh'), cfg_path, str(procs),
               '--work-dir', train_dir]
    else:
        cmd = [args.python, osp.join(ROOT, 'tools', 'train.py'), cfg_path,
               '--work-dir', train_dir]
    run(cmd, env, osp.join(run_dir, 'train.log'))
    train_s = time.time() - t0
    ckpt = osp.join(train_dir, f"iter_{sched['iters']}.pth")
    env['OMP_NUM_THREADS'] = str(args.threads)
    test_log = osp.join(run_dir, 'test.log')
    run([args.python, osp.join(ROOT, 'tools', 'test.py'), cfg_path, ckpt,
         '--work-dir', osp.join(run_dir, 'test')], env, test_log)
    metrics = read_metrics(test_log)
    curve = read_curve(train_dir)
    if not args.keep_checkpoints and key != 'bn8':
        os.remove(ckpt)
    gn = [g for g in curve['grad_norm'] if g is not None]
    rec = dict(norm=row['norm'], where=row['where'], images_per_gpu=row['images_per_gpu'],
               processes=procs, seed=seed, iters=sched['iters'], **metrics,
               row=key, recipe=args.recipe, ref_iters=args.ref_iters,
               lr=sched['lr'], warmup_iters=sched['warmup'],
               images_seen=sched['iters'] * row['images_per_gpu'] * procs,
               train_seconds=round(train_s, 1),
               max_grad_norm=max(gn) if gn else None,
               final_loss=curve['loss'][-1] if curve['loss'] else None,
               config=osp.relpath(cfg_path, ROOT), curve=curve)
    if load_from:
        rec['finetuned_from'] = osp.relpath(load_from, ROOT)
    return rec


def ensure_data(args):
    if osp.isfile(osp.join(ROOT, args.data_root, 'annotations', 'val.json')):
        return
    cmd = [args.python, osp.join(ROOT, 'tools', 'make_synthetic.py'), args.data_root]
    if args.tiny:
        cmd += ['--num-train', str(TINY['num_train']), '--num-val', str(TINY['num_val'])]
    subprocess.run(cmd, cwd=ROOT, check=True)


def planned(args):
    """(key, row, seed) for the rows and seeds asked for, BN at 8 first."""
    rows = DIAG_ROWS if args.diagnose else ROWS
    out = []
    for key in (args.only or list(rows)):
        seeds = args.seeds if args.seeds is not None else \
            list(range(1 if args.diagnose else DEFAULT_SEEDS.get(key, 2)))
        for seed in seeds:
            out.append((key, seed))
    return out


def same_run(rec, key, seed, args, iters):
    return (rec.get('row') == key and rec.get('seed') == seed and
            rec.get('recipe') == args.recipe and rec.get('iters') == iters)


def main(argv=None):
    args = parse_args(argv)
    os.chdir(ROOT)
    if args.report_only:
        if args.diagnose:
            write_diag_report(args, load_json(args.diag_json))
        else:
            write_report(args, load_json(args.out_json))
        return 0
    ensure_data(args)
    out_path = args.diag_json if args.diagnose else args.out_json
    records = load_json(out_path)
    failures = []
    for key, seed in planned(args):
        if args.diagnose:
            row = dict(ROWS['mabn2'], _diag=True, label=DIAG_ROWS[key]['label'])
            diag = {k: v for k, v in DIAG_ROWS[key].items() if k != 'label'}
            sched = schedule(args, 2, 1, args.diag_iters)
            sched['lr'] *= diag.pop('lr_scale', 1)
        else:
            row, diag = ROWS[key], None
            sched = schedule(args, row['images_per_gpu'], row['processes'])
        load_from = None
        if row.get('finetune_from'):
            base = ROWS[row['finetune_from']]
            bsched = schedule(args, base['images_per_gpu'], base['processes'])
            load_from = osp.join(ROOT, args.work_root, args.recipe,
                                 f"{row['finetune_from']}_s{seed}", 'train',
                                 f"iter_{bsched['iters']}.pth")
            sched = schedule(args, row['images_per_gpu'], row['processes'],
                             max(1, int(round(args.ref_iters * args.finetune_frac))))
        if any(same_run(r, key, seed, args, sched['iters']) for r in records):
            print(f'[det-study] {key} seed {seed}: recorded, skipped', flush=True)
            continue
        if load_from and not osp.isfile(load_from):
            print(f'[det-study] {key} seed {seed}: needs {load_from} (run bn8 seed {seed} '
                  'first); skipped', flush=True)
            failures.append((key, seed, 'missing checkpoint'))
            continue
        sub = 'diag' if args.diagnose else args.recipe
        run_dir = osp.join(ROOT, args.work_root, sub, f'{key}_s{seed}')
        print(f"[det-study] {key} seed {seed}: {sched['iters']} iters, lr {sched['lr']:.3g}, "
              f'{run_dir}', flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        try:
            rec = one_run(args, key, row, seed, sched, run_dir, load_from, diag)
        except RuntimeError as exc:
            print(f'[det-study] {key} seed {seed} FAILED: {exc}', flush=True)
            failures.append((key, seed, str(exc)[:200]))
            continue
        if args.diagnose:
            rec.update(variant=key, label=DIAG_ROWS[key]['label'])
        records = [r for r in load_json(out_path)
                   if not same_run(r, key, seed, args, sched['iters'])] + [rec]
        write_json(out_path, records)
        print(f"[det-study] {key} seed {seed}: bbox_mAP {rec['bbox_mAP']:.3f} "
              f"(max grad_norm {rec['max_grad_norm']}), {time.time() - t0:.0f} s",
              flush=True)
        if not args.diagnose:
            write_report(args, records)
    if args.diagnose:
        write_diag_report(args, load_json(out_path))
    elif not args.dry_run:
        write_report(args, load_json(out_path))
    if failures:
        print(f'[det-study] {len(failures)} run(s) not done: {failures}', flush=True)
        return 1
    return 0


# ----------------------------------------------------------------------------- report

def _group(records):
    groups = {}
    for r in records:
        groups.setdefault((r.get('recipe'), r.get('ref_iters'), r['row']), []).append(r)
    order = list(ROWS)
    return sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0,
                                                   order.index(kv[0][2])
                                                   if kv[0][2] in order else 99))


def _spread(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else float('nan')
    return mean, std


def _pm(mean, std):
    return f'{mean:.3f}' if math.isnan(std) else f'{mean:.3f} ± {std:.3f}'


def goal_lines(summary):
    """The issue's two tests for every MABN row: above BN at 2 by more than the seed
    spread (every seed above every BN seed), and >= 0.90 of BN at 8's mean bbox mAP.
    ``summary``: row -> (mean, std, lowest seed, highest seed, seeds)."""
    if 'bn2' not in summary:
        return []
    lines = []
    bm, _, blo, bhi, _ = summary['bn2']
    for key, (mm, _, mlo, mhi, _) in summary.items():
        if ROWS.get(key, {}).get('norm') != 'MABN':
            continue
        verdict = ('every MABN seed above every BN seed' if mlo > bhi else
                   'the seed ranges overlap or MABN is below')
        text = (f'{key} minus bn2: {mm - bm:+.3f} bbox mAP (seeds {mlo:.3f}-{mhi:.3f} '
                f'against {blo:.3f}-{bhi:.3f}: {verdict})')
        if summary.get('bn8', (0,))[0] > 0:
            text += f'; {key} / bn8: {mm / summary["bn8"][0]:.2f} (goal: >= 0.90)'
        lines.append(text + '.')
    return lines


def write_report(args, records):
    lines = ['# Detection small-batch study: results', '',
             'Generated by `python -m benchmarks.det_small_batch_study` '
             f"({'tiny smoke-test setting' if args.tiny else 'see docs/det_small_batch_study.md'}). "  # noqa: E501
             'bbox mAP on the synthetic validation split; mean ± sample std over seeds, '
             'then each seed.', '']
    by_setting = {}
    for (recipe, ref_iters, key), recs in _group(records):
        by_setting.setdefault((recipe, ref_iters), []).append((key, recs))
    for (recipe, ref_iters), groups in by_setting.items():
        lines += [f'## recipe `{recipe}`, {ref_iters} iterations at batch 8 '
                  f'({ref_iters * REF_BATCH} training images per run)', '',
                  '| row | norm | where | images/GPU x processes | iters | seeds | '
                  'bbox mAP | bbox mAP@0.5 | per seed (mAP) | max grad norm | train min |',
                  '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |']
        summary = {}
        for key, recs in groups:
            recs = sorted(recs, key=lambda r: r['seed'])
            m, s = _spread([r['bbox_mAP'] for r in recs])
            m50, s50 = _spread([r['bbox_mAP_50'] for r in recs])
            summary[key] = (m, s, min(r['bbox_mAP'] for r in recs),
                            max(r['bbox_mAP'] for r in recs), len(recs))
            per_seed = ', '.join(f"s{r['seed']}: {r['bbox_mAP']:.3f}" for r in recs)
            gns = [r.get('max_grad_norm') for r in recs if r.get('max_grad_norm') is not None]
            tmin = statistics.fmean(r.get('train_seconds', 0) for r in recs) / 60
            r0 = recs[0]
            lines.append(
                f"| {key} | {r0['norm']} | {r0['where']} | {r0['images_per_gpu']} x "
                f"{r0['processes']} | {r0['iters']} | {len(recs)} | "
                f"{_pm(m, s)} | {_pm(m50, s50)} | {per_seed} | "
                f"{max(gns):.1f} | {tmin:.1f} |" if gns else
                f"| {key} | {r0['norm']} | {r0['where']} | {r0['images_per_gpu']} x "
                f"{r0['processes']} | {r0['iters']} | {len(recs)} | "
                f"{_pm(m, s)} | {_pm(m50, s50)} | {per_seed} | - | {tmin:.1f} |")
        lines.append('')
        goals = goal_lines(summary)
        lines += goals + [''] if goals else []
    write_text(args.out_md, '\n'.join(lines) + '\n')
    plot(args, records)


def colours(keys, order):
    """One distinct colour per key, fixed by the key's place in ``order`` (other keys
    after it, sorted): tab20's ten dark hues, its ten light ones, then tab20b's."""
    plt = pyplot()
    palette = ([plt.get_cmap('tab20')(i) for i in range(0, 20, 2)] +
               [plt.get_cmap('tab20')(i) for i in range(1, 20, 2)] +
               [plt.get_cmap('tab20b')(i) for i in range(20)])
    ranked = list(order) + sorted(set(keys) - set(order))
    return {k: palette[ranked.index(k) % len(palette)] for k in keys}


def _finetuned(key, recs):
    return bool(ROWS.get(key, {}).get('finetune_from') or recs[0].get('finetuned_from'))


def plot(args, records):
    """The mAP plot (a bar per row, a dot per seed; the fine-tunes after the from-scratch
    rows; BN at 8 and the goal, 0.9 x its mean, as lines) and the curve plot (loss and
    gradient norm of each row's lowest seed); one colour per row in both."""
    if not records:
        return
    plt = pyplot()
    prefix = 'det_small_batch_study' + ('_tiny' if args.tiny else '')
    groups = _group(records)
    groups = ([g for g in groups if not _finetuned(g[0][2], g[1])] +
              [g for g in groups if _finetuned(g[0][2], g[1])])
    colour = colours([k[2] for k, _ in groups], ROWS)
    recipes = len({k[:2] for k, _ in groups}) > 1
    tuned = [_finetuned(k[2], recs) for k, recs in groups]
    xs = [n + (0.6 if t else 0) for n, t in enumerate(tuned)]  # a gap before the fine-tunes
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(groups) + 2), 4.2))
    for x, ((recipe, ref_iters, key), recs) in zip(xs, groups):
        vals = [r['bbox_mAP'] for r in recs]
        ax.bar(x, statistics.fmean(vals), color=colour[key], alpha=0.45, width=0.8)
        ax.scatter([x] * len(vals), vals, color=colour[key], edgecolor='black', s=22,
                   zorder=3)
    for (recipe, ref_iters, key), recs in groups:  # BN at 8 and the goal, per setting
        if key != 'bn8':
            continue
        span = [x for x, (k, _) in zip(xs, groups) if k[:2] == (recipe, ref_iters)]
        ref = statistics.fmean(r['bbox_mAP'] for r in recs)
        ax.hlines(ref, span[0] - 0.5, span[-1] + 0.5, color='black', lw=1,
                  label=f'BN at 8 (bn8): {ref:.3f}')
        ax.hlines(0.9 * ref, span[0] - 0.5, span[-1] + 0.5, color='black', lw=1,
                  linestyle='--', label=f'goal, 0.9 x bn8: {0.9 * ref:.3f}')
    if any(tuned) and not all(tuned):
        first = xs[tuned.index(True)]
        ax.axvline(first - 0.8, color='grey', lw=1, linestyle=':')
        ax.text(first - 0.7, ax.get_ylim()[1] * 0.97, 'fine-tuned', fontsize=8, va='top',
                color='grey')
    ax.set_xticks(xs)
    ax.set_xticklabels([f'{k[2]} ({k[0]})' if recipes else k[2] for k, _ in groups],
                       fontsize=8, rotation=35, ha='right')
    ax.set_ylabel('bbox mAP (val)')
    ax.set_title('Toy RetinaNet R18-FPN: bar = mean, dots = seeds; from scratch, then the '
                 'fine-tunes (from bn8)', fontsize=9)
    ax.legend(fontsize=8, loc='upper left')
    fig.tight_layout()
    save_figure(fig, osp.join(args.img_dir, prefix + '_map.png'))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    images = {(r['row'], r['seed']): r.get('images_seen', 0) for r in records}
    for (recipe, ref_iters, key), recs in groups:
        r = min(recs, key=lambda r: r['seed'])
        c = r.get('curve') or {}
        if not c.get('iter'):
            continue
        batch = r['images_per_gpu'] * r['processes']
        base = ROWS.get(key, {}).get('finetune_from')
        start = images.get((base, r['seed']), 0) if base else 0
        label = f"{key} ({recipe + ', ' if recipes else ''}s{r['seed']}" + \
            (f', from {base} at {start} images)' if base else ')')
        style = dict(lw=1.2, color=colour[key], linestyle='--' if base else '-')
        x = [start + it * batch for it in c['iter']]
        axes[0].plot(x, c['loss'], label=label, **style)
        axes[1].plot(x, [g if g is not None else math.nan for g in c['grad_norm']], **style)
    axes[0].set_ylabel('training loss')
    axes[1].set_ylabel('grad norm (before clipping at 10)')
    axes[1].set_yscale('log')
    for a in axes:
        a.set_xlabel('training images seen (fine-tunes: after their base run)')
    fig.tight_layout()
    legend = fig.legend(*axes[0].get_legend_handles_labels(), loc='center left',
                        bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    for handle in legend.legend_handles:
        handle.set_linewidth(3)
    save_figure(fig, osp.join(args.img_dir, prefix + '_curves.png'))
    plt.close(fig)


def write_diag_report(args, records):
    if not records:
        return
    md = osp.splitext(args.diag_json)[0] + '.md'
    lines = ['# Detection small-batch study: MABN diagnosis', '',
             'Generated by `python -m benchmarks.det_small_batch_study --diagnose`. ConvWC + '
             '`MABNDiag` (the spec with switchable parts) in the backbone, 2 images per '
             'batch; staleness = mean relative distance of the moving average from this '
             "batch's statistic, over layers and the logged iterations after warm-up.", '',
             '| variant | what | recipe | iters | seed | bbox mAP | bbox mAP@0.5 | '
             'max grad norm | median grad norm | stale fwd median / max | '
             'stale bwd median / max | final loss |',
             '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']

    def med(vals):
        vals = [v for v in vals if v is not None]
        return f'{statistics.median(vals):.3g}' if vals else '-'

    def med_max(vals):
        vals = [v for v in vals if v is not None]
        return f'{statistics.median(vals):.3g} / {max(vals):.3g}' if vals else '-'

    for r in records:
        c = r.get('curve', {})
        lines.append(
            f"| {r['variant']} | {r['label']} | {r['recipe']} | {r['iters']} | {r['seed']} | "
            f"{r['bbox_mAP']:.3f} | {r['bbox_mAP_50']:.3f} | {r['max_grad_norm'] or 0:.1f} | "
            f"{med(c.get('grad_norm', []))} | {med_max(c.get('stale_fwd', []))} | "
            f"{med_max(c.get('stale_bwd', []))} | {r['final_loss'] or 0:.3f} |")
    write_text(md, '\n'.join(lines) + '\n')
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    colour = colours({r['variant'] for r in records}, DIAG_ROWS)
    seeds = sorted({r['seed'] for r in records})
    dashes = ['-', '--', ':', '-.']
    for r in records:
        c = r.get('curve', {})
        if not c.get('iter'):
            continue
        style = dict(lw=1, color=colour[r['variant']],
                     linestyle=dashes[seeds.index(r['seed']) % len(dashes)])
        axes[0].plot(c['iter'], c['loss'], **style)
        axes[1].plot(c['iter'], [g if g is not None else math.nan for g in c['grad_norm']],
                     **style)
        if c.get('stale_bwd'):
            n = len(c['stale_bwd'])
            axes[2].plot(c['iter'][-n:], c['stale_bwd'], **style)
    axes[0].set_ylabel('training loss')
    axes[1].set_ylabel('grad norm')
    axes[1].set_yscale('log')
    axes[2].set_ylabel('backward SMA staleness |mgz-gz|/|gz|')
    axes[2].set_yscale('log')
    for a in axes:
        a.set_xlabel('iteration (2 images)')
    variants = [v for v in list(DIAG_ROWS) + sorted(set(colour) - set(DIAG_ROWS))
                if v in colour]
    handles = [plt.Line2D([], [], color=colour[v], lw=2) for v in variants] + \
        [plt.Line2D([], [], color='black', lw=1, linestyle=dashes[i % len(dashes)])
         for i in range(len(seeds))]
    labels = [v + ('' if any(r.get('curve', {}).get('stale_bwd') for r in records
                             if r['variant'] == v) else ' (no backward SMA)')
              for v in variants] + [f'seed {s}' for s in seeds]
    fig.tight_layout()
    fig.legend(handles, labels, loc='center left', bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    save_figure(fig, osp.join(args.img_dir, 'det_small_batch_study_diagnosis.png'))
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())

"""End-to-end cost of each norm choice in the toy RetinaNet R18-FPN, as ratios to BN.

    python -m benchmarks.bench_toy [--quick] [--out-md FILE] [--out-png FILE]
        [--batch-size 8] [--repeats 7] [--threads N] [--sync-procs 2]

Models: built from the toy configs (``configs/toy/``) with mmengine's Config and mmdet's
MODELS registry, random initial weights (``init_weights()``), no checkpoint, no dataset
on disk (``VARIANTS``: name -> config and overrides). MABN layers are set past their
warm-up and renorm start, the steady state of most of a schedule.

(a) Training iteration: ``model.train_step(batch, optim_wrapper)``, what mmengine's
training loop runs per iteration without data loading: data preprocessing, forward,
losses, backward, gradient clipping and the AdamW step of the config's optim_wrapper.
Every variant sees the same batches of ``--batch-size`` synthetic images (128x128, with
their boxes, made in memory by ``mmdet_bnplug.testing.synthetic``); the same batch size for all
variants, so that only the norm differs. Variants run interleaved (one iteration each
per round, order rotated) after three untimed iterations each; the median over
``--repeats`` rounds is divided by the BN toy's. With ``--sync-procs`` N > 1, N gloo
processes (threads split between them) each train the BN and the PortableSyncBN toy,
wrapped in mmengine's MMDistributedDataParallel, on ``batch-size / N`` images per rank:
the ratio is to the BN toy under the same DDP.

(b) Inference: each variant's model after (a), in eval mode, its norm layers' statistics
and affine set to random values (so that folding has something to fold; layers with their
own eval map, MABN, keep ``running_mean`` at 0), timed on a batch of ``--batch-size``
images from input tensor to the head's outputs (``mode='tensor'``: no box decoding or
NMS, which fusing does not touch), unfused and after ``mmdet_bnplug.transforms.convert.fuse_norm``,
interleaved, each sample timing enough forwards for about 0.5 s. Reported: ratios, the
speed-up, and the largest absolute difference between the outputs of the two (with the
largest output magnitude for scale).
"""
import copy
import itertools
import os
import os.path as osp

import numpy as np
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.optim import build_optim_wrapper
from mmengine.structures import InstanceData

from benchmarks.bench_utils import (
    DEFAULT_REPEATS,
    benchmark_parser,
    grouped_bars,
    interleaved_medians,
    markdown_table,
    pyplot,
    run_info,
    run_on_gloo,
    save_figure,
    write_text,
)
from mmdet_bnplug.layers.mabn import MABN
from mmdet_bnplug.testing.synthetic import SyntheticSpec, make_image
from mmdet_bnplug.transforms import fuse_norm
from mmdet_bnplug.utils.bn_like import bn_like_layers

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOY = osp.join(REPO, 'configs', 'toy', 'retinanet_r18_fpn_{}_toy.py')
NORM = 'model.backbone.norm_cfg'
# name -> (toy config, cfg overrides, folds for inference); the first entry is the baseline
VARIANTS = {
    'BN': ('bn', {}, True),
    'EvalBN': ('evalbn', {}, True),
    'EvalBN frozen': ('evalbn', {NORM + '.requires_grad': False}, True),
    'ConvWC+MABN': ('mabn', {}, True),
    'PortableSyncBN': ('syncbn', {}, True),
    'GN': ('bn', {NORM: dict(type='GN', num_groups=32, requires_grad=True)}, False),
}
SYNC_PAIR = ('BN', 'PortableSyncBN')
QUICK = dict(batch_size=2, repeats=1, warmup=0, infer_sample_s=0.0)
WARMUP = 2  # iterations per model before timing (the first ones allocate, AdamW state)
INFER_SAMPLE_S = 0.5  # an inference sample times enough forwards for this many seconds


def quiet_logs():
    """mmengine's current logger at ERROR: no per-parameter init logs, and none of the
    optimizer's warnings on each frozen parameter it skips (EvalBN frozen: all of them)."""
    MMLogger.get_instance('bench_toy', log_level='ERROR')


def build(name):
    """(model in training mode, its optim_wrapper) for a variant; seeded, random init."""
    config, options, _ = VARIANTS[name]
    cfg = Config.fromfile(TOY.format(config))
    cfg.merge_from_dict(options)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    for layer in model.modules():
        if isinstance(layer, MABN):  # past warm-up and renorm start
            layer.num_batches_tracked.fill_(
                max(layer.warmup_iters, layer.renorm_iters, layer.buffer_size) + 1)
    return model.train(), build_optim_wrapper(model, cfg.optim_wrapper)


def make_batches(count, batch_size, seed):
    """``count`` batches in the form a detector's train_step takes, synthetic images."""
    rng, spec = np.random.default_rng(seed), SyntheticSpec()
    size = spec.image_size
    batches = []
    for _ in range(count):
        inputs, samples = [], []
        for _ in range(batch_size):
            img, objects = make_image(rng, spec)
            inputs.append(torch.from_numpy(img[..., ::-1].transpose(2, 0, 1).copy()))  # BGR
            sample = DetDataSample(metainfo=dict(img_shape=(size, size),
                                                 ori_shape=(size, size),
                                                 scale_factor=(1.0, 1.0)))
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([box for _, box, _ in objects], dtype=torch.float32),
                labels=torch.tensor([cls for cls, _, _ in objects], dtype=torch.long))
            samples.append(sample)
        batches.append(dict(inputs=inputs, data_samples=samples))
    return batches


def train_times(models, batches, rounds, warmup):
    """Median seconds per training iteration of each (model, optim_wrapper), interleaved;
    also the last iteration's total loss per model."""
    losses = {}

    def iteration(name, model, optim, cycle):
        log_vars = model.train_step(next(cycle), optim)
        losses[name] = float(log_vars['loss'].detach())

    steps = {name: (lambda n=name, m=m, o=o, c=itertools.cycle(batches): iteration(n, m, o, c))
             for name, (m, o) in models.items()}
    return interleaved_medians(steps, rounds, target_s=0.0, warmup=warmup), losses


def _sync_worker(rank, world_size, batch_size, rounds, warmup):
    """Iteration times of the BN and PortableSyncBN toys under DDP on this rank."""
    register_all_modules()
    quiet_logs()
    models = {}
    for name in SYNC_PAIR:
        model, optim = build(name)
        models[name] = (MMDistributedDataParallel(module=model), optim)
    batches = make_batches(2, batch_size, seed=1 + rank)
    return train_times(models, batches, rounds, warmup)


def randomise_norms(model, seed=0):
    """Random statistics and affine in every BN-like layer (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in bn_like_layers(model):
            c = layer.running_var.numel()
            layer.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
            if not hasattr(layer, 'eval_scale_shift'):
                layer.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            if getattr(layer, 'weight', None) is not None:
                layer.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                layer.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model


def _flat_outputs(model, inputs):
    with torch.no_grad():
        outputs = model(inputs, mode='tensor')
    return torch.cat([t.flatten() for level in outputs for t in level])


def inference(models, batch, rounds, warmup, sample_s):
    """Per variant: unfused and fused eval-model seconds (samples of about ``sample_s``),
    max |difference|, max |output|, norm layers left after fusing."""
    nets = {}
    for name, (model, _) in models.items():
        if VARIANTS[name][2]:
            unfused = randomise_norms(copy.deepcopy(model).eval())
            nets[name] = unfused
            nets[name + ' fused'] = fuse_norm(copy.deepcopy(unfused)).eval()
    base = next(iter(nets.values()))
    inputs = base.data_preprocessor(batch, False)['inputs']
    steps = {n: (lambda net=net: _flat_outputs(net, inputs)) for n, net in nets.items()}
    times = interleaved_medians(steps, rounds, target_s=sample_s, warmup=warmup)
    rows = {}
    for name in (n for n in nets if not n.endswith(' fused')):
        ref = _flat_outputs(nets[name], inputs)
        fused = _flat_outputs(nets[name + ' fused'], inputs)
        rows[name] = dict(unfused=times[name], fused=times[name + ' fused'],
                          diff=float((ref - fused).abs().max()), scale=float(ref.abs().max()),
                          left=len(bn_like_layers(nets[name + ' fused'])))
    return rows


def report(train, losses, sync, procs, infer, info) -> str:
    """The markdown report: training iteration table, inference table."""
    base = next(iter(train))
    rows = [[name, t * 1e3, t / train[base], losses[name]] for name, t in train.items()]
    if sync:
        times, sync_losses = sync
        bn = times[SYNC_PAIR[0]]
        rows += [[f'{n} x{procs} (DDP)', times[n] * 1e3, times[n] / bn, sync_losses[n]]
                 for n in SYNC_PAIR]
    out = [f'# Toy RetinaNet R18-FPN: end-to-end cost of the norm choices\n\n{info}\n',
           '## Training iteration (forward, losses, backward, optimizer step)\n',
           f'Ratio to {base} in the same run'
           + (f' (the x{procs} rows: to {SYNC_PAIR[0]} x{procs} under the same DDP)'
              if sync else '')
           + '. Loss: the last timed iteration\'s total loss (random init).\n',
           markdown_table(['variant', 'ms / iteration', f'ratio to {base}', 'loss'], rows)]
    base_inf = infer[next(iter(infer))]['unfused']
    out += ['\n## Inference (eval mode, input tensor to head outputs)\n',
            f'Ratios to the unfused {base} model; speed-up = unfused / fused time; '
            'max abs diff: largest absolute difference of any output, fused vs unfused '
            '(max abs output for scale).\n',
            markdown_table(
                ['variant', 'unfused ms', 'fused ms', 'unfused ratio', 'fused ratio',
                 'speed-up', 'max abs diff', 'max abs output', 'norms left'],
                [[n, r['unfused'] * 1e3, r['fused'] * 1e3, r['unfused'] / base_inf,
                  r['fused'] / base_inf, r['unfused'] / r['fused'], f'{r["diff"]:.2e}',
                  r['scale'], r['left']] for n, r in infer.items()])]
    return '\n'.join(out) + '\n'


def plot(path, train, sync, procs, infer):
    """Bars: training iteration ratio per variant; inference ratios unfused and fused."""
    plt = pyplot()
    base = next(iter(train))
    names = list(train)
    ratios = [train[n] / train[base] for n in names]
    if sync:
        names.append(f'{SYNC_PAIR[1]} x{procs} (DDP)')
        ratios.append(sync[0][SYNC_PAIR[1]] / sync[0][SYNC_PAIR[0]])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    grouped_bars(axes[0], names, {'training iteration': ratios},
                 f'iteration time / {base}', log=False, annotate=True)
    axes[0].set_title('Training iteration, ratio to BN (xN: to BN under the same DDP)')
    base_inf = infer[next(iter(infer))]['unfused']
    grouped_bars(axes[1], list(infer),
                 {kind: [r[kind] / base_inf for r in infer.values()]
                  for kind in ('unfused', 'fused')},
                 f'inference time / unfused {base}', log=False, annotate=True)
    axes[1].legend(fontsize=8)
    axes[1].set_title('Inference with and without fuse_norm')
    save_figure(fig, path)


def main():
    parser = benchmark_parser(
        __doc__, f'batch {QUICK["batch_size"]}, {QUICK["repeats"]} round, no warm-up',
        list(VARIANTS)[1:], 'the PortableSyncBN DDP rows')
    parser.add_argument('--batch-size', type=int, default=None,
                        help="images per iteration and inference batch (default: the BN "
                        "toy config's train batch size, 8)")
    args = parser.parse_args()
    register_all_modules()
    quiet_logs()
    batch_size = args.batch_size or (
        QUICK['batch_size'] if args.quick
        else Config.fromfile(TOY.format('bn')).train_dataloader.batch_size)
    rounds = args.repeats or (QUICK['repeats'] if args.quick else DEFAULT_REPEATS)
    warmup = QUICK['warmup'] if args.quick else WARMUP
    threads = max(1, args.threads // max(1, args.sync_procs))
    if args.sync_procs > 1 and batch_size % args.sync_procs:
        parser.error(f'--batch-size {batch_size} must be divisible by --sync-procs '
                     f'{args.sync_procs}')
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    models = {name: build(name) for i, name in enumerate(VARIANTS)
              if i == 0 or args.only is None or name in args.only}
    train, losses = train_times(models, make_batches(2, batch_size, seed=1), rounds, warmup)
    print('training iterations: done', flush=True)
    infer = inference(models, make_batches(1, batch_size, seed=2)[0], rounds,
                      min(warmup, 1),
                      QUICK['infer_sample_s'] if args.quick else INFER_SAMPLE_S)
    print('inference: done', flush=True)
    sync = None
    if args.sync_procs > 1:
        sync = run_on_gloo(_sync_worker, args.sync_procs, threads,
                           batch_size // args.sync_procs, rounds, warmup)
    per_rank = f', {batch_size // args.sync_procs} per rank' if args.sync_procs > 1 else ''
    info = run_info(args.threads, args.sync_procs, threads, load_before,
                    f'batches of {batch_size} images of 128x128{per_rank}, median of '
                    f'{rounds} interleaved rounds after {warmup} warm-up iterations')
    text = report(train, losses, sync, args.sync_procs, infer, info)
    print(text)
    write_text(args.out_md, text)
    if args.out_png:
        plot(args.out_png, train, sync, args.sync_procs, infer)


if __name__ == '__main__':
    main()

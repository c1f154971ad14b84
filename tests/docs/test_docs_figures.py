"""The figures README.md and docs/ quote for the main results equal the generated reports
they cite (bench_norms, bench_toy, bench_export, the small-batch and the detection
study): a rerun that changes a reported number, or an edit of a quoted one, fails here
until both agree. A report may hold rows that no doc quotes. No training: markdown and
json only."""
import functools
import json
import os.path as osp
import re
import statistics
from decimal import ROUND_HALF_UP, Decimal

import pytest

from conftest import REPO

NORMS = 'docs/bench_norms_results.md'
TOY = 'docs/bench_toy_results.md'
EXPORT = 'docs/bench_export_results.md'
SMALL = 'docs/small_batch_study_results.md'
DET = 'docs/det_small_batch_study_results.md'
DET_JSON = 'docs/det_small_batch_study_results.json'
DIAG = 'docs/det_small_batch_study_diagnosis.md'
DET_SECTION = 'recipe `adamw`, 600 iterations'
FIGURE = r'([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?: ± \d+(?:\.\d+)?)?)'


@functools.lru_cache(maxsize=None)
def text(path):
    with open(osp.join(REPO, path)) as f:
        return f.read()


def flat(path):
    """The file's text with every run of whitespace as one space."""
    return ' '.join(text(path).split())


def _cells(line):
    return [c.strip() for c in line.strip().strip('|').split('|')]


@functools.lru_cache(maxsize=None)
def tables(path):
    """``[(section, header, rows)]`` of every markdown table in ``path``: ``section`` the
    last heading above it (outside code blocks), ``rows`` dicts by header; a header name
    that occurs more than once is prefixed by the name before it (``fwd+bwd median
    worst``)."""
    out, section, lines, fenced = [], '', text(path).splitlines(), False
    i = 0
    while i < len(lines):
        line = lines[i]
        fenced ^= line.startswith('```')
        if line.startswith('#') and not fenced:
            section = line.lstrip('#').strip()
        if line.startswith('|') and i + 1 < len(lines) and \
                re.fullmatch(r'\|(\s*:?-+:?\s*\|)+', lines[i + 1].strip()):
            names = _cells(line)
            header = [f'{names[k - 1]} {n}' if names.count(n) > 1 else n
                      for k, n in enumerate(names)]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith('|'):
                rows.append(dict(zip(header, _cells(lines[i]))))
                i += 1
            out.append((section, header, rows))
            continue
        i += 1
    return out


def cell(path, section, row, column):
    """The one cell of ``column`` in the row whose first cell is ``row`` (or whose cells
    match the dict ``row``), in a table under a heading containing ``section``."""
    key = row if isinstance(row, dict) else None
    found = [r[column] for sec, header, rows in tables(path)
             if section in sec and column in header for r in rows
             if (all(r.get(k) == v for k, v in key.items()) if key else
                 r[header[0]] == row)]
    assert len(found) == 1, f'{path}: {len(found)} cells for {row!r}, {column!r} in {section!r}'
    return found[0]


def in_text(path, template):
    """The figure at ``{}`` of ``template`` in the report's own text."""
    return re.search(_pattern(template), flat(path)).group(1)


def _pattern(template):
    """A regex for ``template`` in flattened text, each ``{}`` a figure."""
    return re.escape(' '.join(template.split())).replace(re.escape('{}'), FIGURE)


def agrees(quoted, reported):
    """``quoted`` is ``reported`` rounded (half up) to the quoted number of decimals;
    ``a ± b`` part by part."""
    quoted, reported = quoted.split(' ± '), str(reported).strip('*% x').split(' ± ')
    if len(quoted) != len(reported):
        return False
    for q, r in zip(quoted, reported):
        places = Decimal(1).scaleb(Decimal(q).as_tuple().exponent)
        if Decimal(r).quantize(places, ROUND_HALF_UP) != Decimal(q):
            return False
    return True


def det(row, column='bbox mAP'):
    return cell(DET, DET_SECTION, row, column)


def det_mean(row):
    return det(row).split(' ± ')[0]


def det_seed(row, seed):
    return re.search(rf'\bs{seed}: ([0-9.]+)', det(row, 'per seed (mAP)')).group(1)


def det_seed_range(row):
    return spread(re.findall(r's\d+: ([0-9.]+)', det(row, 'per seed (mAP)')))


def norms(layer, column):
    return cell(NORMS, 'Summary', layer, column)


def sync2(shape, column):
    return cell(NORMS, 'PortableSyncBN on 2 gloo processes', shape, column)


def toy(variant):
    return cell(TOY, 'Training iteration', variant, 'ratio to BN')


EXPORT_COLUMNS = ('1x3x128x128, 1 thread', '1x3x128x128, 2 threads', '1x3x512x512, 1 thread',
                  '1x3x512x512, 2 threads')


def spread(values):
    """``[lowest, highest]`` of figures given as text."""
    values = sorted(values, key=Decimal)
    return [values[0], values[-1]]


def export_range(variant):
    return spread(cell(EXPORT, 'Summary', variant, c) for c in EXPORT_COLUMNS)


def compiled(layer, column='median'):
    return cell(NORMS, 'torch.compile: compiled', layer, column)


TOY_FUSED = ('BN', 'EvalBN', 'EvalBN frozen', 'ConvWC+MABN', 'PortableSyncBN')


def inference(variant, column):
    return cell(TOY, 'Inference', variant, column)


def small(method, batch, column='accuracy % (mean ± std)'):
    return cell(SMALL, '', {'method': method, 'norm batch': batch}, column)


def difference(a, b):
    return str(Decimal(a) - Decimal(b))


# (doc, template, reported figures): every match of the template in the doc (whitespace
# folded) must quote, at each ``{}``, its reported figure rounded to the quoted precision
README = 'README.md'
CLAIMS = [
    # Which norm?
    (README, '8 images per GPU: {})', [det('bn8')]),
    (README, '`evalbn2`: fine-tuned at 2 images from `bn8`\'s checkpoint, {} (',
     [det('evalbn2')]),
    (README, '`EvalBN, fine-tuned` {}% against `BN, fine-tuned` at 2, {}%',
     [small('EvalBN, fine-tuned', '2'), small('BN, fine-tuned', '2')]),
    (README, '`gn2`, {}, beats every BN-like row at 2 images', [det('gn2')]),
    (README, 'the best MABN row, `mabn2_all_lvl_late` {} (shared: `mabn2_all_late` {})', [
        det('mabn2_all_lvl_late'), det('mabn2_all_late')]),
    (README, '`gn2` {}; `mabn2_late` {}; `bn2_convwc` {}, most of', [
        det('gn2'), det('mabn2_late'), det('bn2_convwc')]),
    (README, 'plain BN at 2 (`bn2`, {})', [det('bn2')]),
    (README, '`mabn2_batch` (they never start) {}, `mabn2` (from the end of the lr warm-up) {} (',
     [det('mabn2_batch'), det('mabn2')]),
    (README, '`syncbn4x2_global` (4 x 2 images) {} against `bn8` {}, an open issue',
     [det('syncbn4x2_global'), det('bn8')]),
    (README, 'without the hook `syncbn4x2` {} (', [det('syncbn4x2')]),
    (README, '`ConvWC+MABN` {}-{}x, `EvalBN` {}-{}x, `PortableSyncBN` {}-{}x; `GN` keeps {} '
     'normalisation nodes: {}-{}x', [
         *export_range('ConvWC+MABN'), *export_range('EvalBN'),
         *export_range('PortableSyncBN'),
         cell(EXPORT, '1x3x128x128, 1 thread', 'GN', 'norm nodes'), *export_range('GN')]),
    (README, 'against BN\'s: `ConvWC+MABN` {}x, `EvalBN` {}x, `GN` {}x; `PortableSyncBN x2 '
     '(DDP)` on 2 gloo processes {}x', [
         toy('ConvWC+MABN'), toy('EvalBN'), toy('GN'), toy('PortableSyncBN x2 (DDP)')]),
    # Deploy
    (README, 'folded ConvWC + MABN runs at {}-{}x folded BN and GN at {}-{}x', [
        *export_range('ConvWC+MABN'), *export_range('GN')]),
    # Configs
    (README, 'study row `mabn2_all_lvl_late`, {} bbox mAP against {} for the backbone-only '
     'recipe; with the head\'s norms shared across the levels (`mabn2_all_late`) it fails, {}',
     [det('mabn2_all_lvl_late'), det('mabn2_late'), det('mabn2_all_late')]),
    # Results: the detection study
    (README, 'BN at 8 images {}; at 2 images BN {} and', [det('bn8'), det('bn2')]),
    (README, '`configs/toy/retinanet_r18_fpn_mabn_2img_toy.py`) {}, every seed above every '
     'BN seed ({} seeds each)', [det('mabn2_late'), det('mabn2_late', 'seeds')]),
    (README, 'does as well ({}, {} seeds)', [det('mabn2_batch'), det('mabn2_batch', 'seeds')]),
    (README, 'no better than BN ({}, a gradient spike)', [det('mabn2')]),
    (README, 'GN at 2 ({}) beats every BN-like row at 2 images', [det_mean('gn2')]),
    (README, 'GlobalLossNormHook ({}, {} seeds; {} without the hook)', [
        det('syncbn4x2_global'), det('syncbn4x2_global', 'seeds'), det_mean('syncbn4x2')]),
    # Results: bench_norms and bench_toy
    (README, '| `MABN` (compiled CPU step) | {}x, {}x | {}x | {}x (with ConvWC) |', [
        norms('MABN', 'fwd+bwd median'), norms('MABN', 'fwd+bwd median worst'),
        norms('MABN', 'peak mem median'), toy('ConvWC+MABN')]),
    (README, 'PyTorch step (other devices) | {}x, {}x on a small map (Python overhead) | {}x', [
        norms('MABN PyTorch step', 'fwd+bwd median'),
        norms('MABN PyTorch step', 'fwd+bwd median worst'),
        norms('MABN PyTorch step', 'peak mem median')]),
    (README, 'plain tensor ops (float64) | {}x, {}x | {}x', [
        norms('MABN naive', 'fwd+bwd median'), norms('MABN naive', 'fwd+bwd median worst'),
        norms('MABN naive', 'peak mem median')]),
    (README, 'the same kernel) | {}x, {}x | {}x | {}x |', [
        cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', 'time median'),
        cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', 'time median worst'),
        cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', 'peak mem median'), toy('EvalBN')]),
    (README, '2 gloo processes | {}x, {}x on P7; BN plus the same two collectives alone: {}x, '
     '{}x | {}x | {}x under DDP', [
         sync2('time / BN', 'median'), sync2('time / BN', 'worst'),
         sync2('floor / BN', 'median'), sync2('floor / BN', 'worst'),
         norms('PortableSyncBN x2', 'peak mem median'), toy('PortableSyncBN x2 (DDP)')]),
    # Results: the small-batch study
    (README, '{} seeds, {} min): BN at normalisation batch 2 reaches {}% against {}% at 32; '
     'MABN + ConvWC at 2 reaches {}%, closing {}% of the gap; GN {}%; PortableSyncBN over 2 '
     'processes x 2 reaches {}% against BN at 4\'s {}%', [
         str(len(small('BN', '2', 'per seed').split(','))),
         in_text(SMALL, 'runs in {} min wall time'), small('BN', '2'), small('BN', '32'),
         small('MABN + ConvWC', '2'), small('MABN + ConvWC', '2', 'gap closed'),
         small('GN', 'any (per sample)').split(' ± ')[0],
         small('PortableSyncBN, 2 processes x 2', '4 (2 x 2 processes)'), small('BN', '4')]),
    # docs/benchmarks.md
    ('docs/benchmarks.md', 'fwd+bwd {}x BN\'s time at the median, the worst {}x, and {}-{}x '
     'BN\'s peak memory on every shape', [
         norms('MABN', 'fwd+bwd median'), norms('MABN', 'fwd+bwd median worst'),
         norms('MABN', 'peak mem median'), norms('MABN', 'peak mem median worst')]),
    ('docs/benchmarks.md', 'Python\'s fixed cost: {}x at worst, {}x at the median', [
        norms('MABN PyTorch step', 'fwd+bwd median worst'),
        norms('MABN PyTorch step', 'fwd+bwd median')]),
    ('docs/benchmarks.md', '(`MABN naive`) takes {}x and {}x the memory', [
        norms('MABN naive', 'fwd+bwd median'), norms('MABN naive', 'peak mem median')]),
    ('docs/benchmarks.md', 'the same native kernel): {}x of it at the median, single shapes '
     'scattering around 1 (worst {}x)', [
         cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', 'time median'),
         cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', 'time median worst')]),
    ('docs/benchmarks.md', 'scale/shift path: {}x of frozen BN\'s time and {}x its memory', [
        cell(NORMS, 'EvalBN against', 'EvalBN frozen / BN eval frozen', 'time median'),
        cell(NORMS, 'EvalBN against', 'EvalBN frozen / BN eval frozen', 'peak mem median')]),
    ('docs/benchmarks.md', 'in one process is plain BN ({}x). On 2 gloo processes it is {}x BN '
     'at the median, against a floor of {}x', [
         norms('PortableSyncBN', 'fwd+bwd median'), sync2('time / BN', 'median'),
         sync2('floor / BN', 'median')]),
    ('docs/benchmarks.md', 'its own arithmetic: {}x the floor', [sync2('time / floor', 'median')]),
    ('docs/benchmarks.md', '({}x BN on P7, floor {}x)', [sync2('time / BN', 'worst'),
                                                         sync2('floor / BN', 'worst')]),
    ('docs/benchmarks.md', '**GroupNorm(32)**: {}x BN\'s training time here, {}x its memory', [
        norms('GroupNorm', 'fwd+bwd median'), norms('GroupNorm', 'peak mem median')]),
    ('docs/benchmarks.md', 'against BN, EvalBN {}x, EvalBN frozen {}x, ConvWC+MABN {}x, '
     'PortableSyncBN {}x (one process), GN {}x; under DDP on 2 gloo processes PortableSyncBN '
     '{}x', [toy('EvalBN'), toy('EvalBN frozen'), toy('ConvWC+MABN'), toy('PortableSyncBN'),
             toy('GN'), toy('PortableSyncBN x2 (DDP)')]),
    ('docs/benchmarks.md', 'fwd+bwd over eager is {}x at the median for BN, {}x for '
     'PortableSyncBN, {}-{}x for MABN and EvalBN, {}x for GroupNorm, and {}x for mmdet\'s '
     'FrozenBN', [compiled('BatchNorm2d'), compiled('PortableSyncBN'),
                  *spread(compiled(n) for n in ('MABN', 'EvalBN', 'EvalBN frozen')),
                  compiled('GroupNorm'), compiled('FrozenBN')]),
    ('docs/benchmarks.md', 'the compiled call\'s overhead doubles the time (worst {}-{}x)', [
        *spread(compiled(n, 'worst') for n in ('BatchNorm2d', 'MABN', 'EvalBN', 'EvalBN frozen',
                                               'PortableSyncBN', 'FrozenBN', 'GroupNorm'))]),
    ('docs/benchmarks.md', '`fuse_norm` removes every norm layer ({} left, outputs within {} '
     'absolute of the unfused model); its speed-ups ({}-{}x)', [
         max(inference(v, 'norms left') for v in TOY_FUSED),
         max((inference(v, 'max abs diff') for v in TOY_FUSED), key=float),
         *spread(inference(v, 'speed-up') for v in TOY_FUSED)]),
    ('docs/benchmarks.md', 'ahead of BN at 2 images on the toy detector only with the averages '
     'started late ({} against {} bbox mAP, {} seeds each)', [
         det_mean('mabn2_late'), det_mean('bn2'), det('mabn2_late', 'seeds')]),
    # docs/mabn.md
    ('docs/mabn.md', 'BN at 8 images (the reference) | {} ({} seeds) |', [
        det('bn8'), det('bn8', 'seeds')]),
    ('docs/mabn.md', '| BN | {} ({} seeds) |', [det('bn2'), det('bn2', 'seeds')]),
    ('docs/mabn.md', '(**the recipe**) | {} ({} seeds) |', [
        det('mabn2_late'), det('mabn2_late', 'seeds')]),
    ('docs/mabn.md', '(the averages never start) | {} ({} seeds) |', [
        det('mabn2_batch'), det('mabn2_batch', 'seeds')]),
    ('docs/mabn.md', 'from the end of the lr warm-up | {} ({} seeds) |', [
        det('mabn2'), det('mabn2', 'seeds')]),
    ('docs/mabn.md', '| ConvWC + BN | {} ({} seeds) |', [
        det('bn2_convwc'), det('bn2_convwc', 'seeds')]),
    ('docs/mabn.md', 'also in the FPN, from 4x the warm-up | {} ({} seeds) |', [
        det('mabn2_neck_late'), det('mabn2_neck_late', 'seeds')]),
    ('docs/mabn.md', '(averages from the warm-up / from 4x it) | {} ({} seeds) / {} ({} seeds) |', [
        det('mabn2_all'), det('mabn2_all', 'seeds'), det('mabn2_all_late'),
        det('mabn2_all_late', 'seeds')]),
    ('docs/mabn.md', '(`LevelNormRetinaHead`; from the warm-up / from 4x it) | {} ({} seeds) / '
     '{} ({} seeds) |', [
        det('mabn2_all_lvl'), det('mabn2_all_lvl', 'seeds'), det('mabn2_all_lvl_late'),
        det('mabn2_all_lvl_late', 'seeds')]),
    ('docs/mabn.md', '(`mabn2_all_late`, {}, {} seeds)', [
        det('mabn2_all_late'), det('mabn2_all_late', 'seeds')]),
    ('docs/mabn.md', '`mabn2_all_lvl_late` {} ({} seeds), against {} in the backbone only and '
     '{} in backbone and FPN', [det('mabn2_all_lvl_late'), det('mabn2_all_lvl_late', 'seeds'),
                               det('mabn2_late'), det('mabn2_neck_late')]),
    ('docs/mabn.md', '(`mabn2_all_lvl`, {})', [det('mabn2_all_lvl')]),
    ('docs/mabn.md', '| GN | {} ({} seeds) |', [det('gn2'), det('gn2', 'seeds')]),
    ('docs/mabn.md', '(`bn2_convwc`: {}, seeds {} and {}, against BN\'s {} and {} and the '
     'batch-statistics MABN\'s {} and {} on the same seeds)', [
         det('bn2_convwc'), det_seed('bn2_convwc', 0), det_seed('bn2_convwc', 1),
         det_seed('bn2', 0), det_seed('bn2', 1), det_seed('mabn2_batch', 0),
         det_seed('mabn2_batch', 1)]),
    ('docs/mabn.md', '(`momentum=0.02`) is no better than BN ({}, two seeds)', [
        det('bn2_m002')]),
    ('docs/mabn.md', 'and costs {}x BN there (the report\'s P7 row)', [
        cell(NORMS, 'fwd+bwd time', 'P7', 'MABN PyTorch step')]),
    ('docs/mabn.md', '- MABN: fwd+bwd {}x BN at the median, every shape within {}x; peak memory '
     '{}-{}x', [norms('MABN', 'fwd+bwd median'), norms('MABN', 'fwd+bwd median worst'),
                norms('MABN', 'peak mem median'), norms('MABN', 'peak mem median worst')]),
    ('docs/mabn.md', '- The PyTorch step: {}x at the median, {}x on the worst (small) map', [
        norms('MABN PyTorch step', 'fwd+bwd median'),
        norms('MABN PyTorch step', 'fwd+bwd median worst')]),
    ('docs/mabn.md', 'The naive spec in float64: {}x (median), {}x the memory', [
        norms('MABN naive', 'fwd+bwd median'), norms('MABN naive', 'peak mem median')]),
    ('docs/mabn.md', 'is {}x its eager time at the median ({}x at best, {}x on small maps)', [
        cell(NORMS, 'torch.compile: compiled', 'MABN', c) for c in ('median', 'best', 'worst')]),
    ('docs/mabn.md', 'load average {} before and {} after', [
        in_text(NORMS, 'load average {} before'), in_text(NORMS, 'before, {} after')]),
    # docs/frozen_bn.md
    ('docs/frozen_bn.md', '| affine trainable (`requires_grad=True`) | {} ({}): the same native '
     'kernel | {} |', [cell(NORMS, 'EvalBN against', 'EvalBN / BN eval', c) for c in (
         'time median', 'time median worst', 'peak mem median')]),
    ('docs/frozen_bn.md', 'against BN eval with a frozen affine | {} ({}) | {} (no input kept) |',
     [cell(NORMS, 'EvalBN against', 'EvalBN frozen / BN eval frozen', c) for c in (
         'time median', 'time median worst', 'peak mem median')]),
    # docs/sync_bn.md
    ('docs/sync_bn.md', 'reaches {} bbox mAP against {} without it, but stays below BN at 8 ({})',
     [det('syncbn4x2_global'), det('syncbn4x2'), det('bn8')]),
    ('docs/sync_bn.md', '| median over the 15 shapes | | {} | {} | {} | |', [
        sync2('time / BN', 'median'), sync2('floor / BN', 'median'),
        sync2('time / floor', 'median')]),
    ('docs/sync_bn.md', '| time / BN, median of 15 shapes | 2.14 | 1.23 | {} |', [
        sync2('time / BN', 'median')]),
    ('docs/sync_bn.md', '| time / floor, median | - | 1.07 | {} |', [
        sync2('time / floor', 'median')]),
    ('docs/sync_bn.md', '| toy iteration under DDP / BN under DDP | 1.27 | 1.37 | {} |', [
        toy('PortableSyncBN x2 (DDP)')]),
    ('docs/sync_bn.md', 'The median is {}x, but', [sync2('time / BN', 'median')]),
    ('docs/sync_bn.md', 'alone (BN plus the two collectives, no arithmetic of ours) is {}x BN on '
     'P4 (2.2 M values), {}x on layer4 2x512x25x42 (1.1 M) and {}x on layer3 2x1024x50x84', [
         sync2(s, 'floor') for s in ('layer3 256 / P4', 'layer4 512', 'layer3 1024')]),
    # docs/deploy.md
    ('docs/deploy.md', 'folded ConvWC + MABN is {}-{}x folded BN in every column', [
        *export_range('ConvWC+MABN')]),
    ('docs/deploy.md', 'GN, which keeps {} normalisation nodes, is {}-{}x', [
        cell(EXPORT, '1x3x128x128, 1 thread', 'GN', 'norm nodes'), *export_range('GN')]),
    ('docs/deploy.md', '({} ms at 128 px and {} ms at 512 px with 1 thread; {} and {} ms with 2)',
     [cell(EXPORT, EXPORT_COLUMNS[k], 'BN', 'onnxruntime ms') for k in (0, 2, 1, 3)]),
    ('docs/deploy.md', '(load average {} before, {} after)', [
        in_text(EXPORT, 'load average {} before'), in_text(EXPORT, 'before, {} after')]),
    # docs/small_batch_study.md
    ('docs/small_batch_study.md', '{} runs (12 methods x 3 seeds) in **{} min wall**', [
        in_text(SMALL, ': {} runs in'), in_text(SMALL, 'runs in {} min wall time')]),
    ('docs/small_batch_study.md', '**BN at normalisation batch 2 is the only clear loss.** {}% '
     'against {}% at 32', [small('BN', '2'), small('BN', '32')]),
    ('docs/small_batch_study.md', 'At 4 BN is already back at {}%', [
        small('BN', '4').split(' ± ')[0]]),
    ('docs/small_batch_study.md', 'gives back only 2.2 of the 6.8 points ({}%)', [
        small('BN', '2', 'with re-estimated BN statistics').split(' ± ')[0]]),
    ('docs/small_batch_study.md', '**MABN + ConvWC at 2 closes {}% of that gap** ({}%', [
        small('MABN + ConvWC', '2', 'gap closed'), small('MABN + ConvWC', '2')]),
    ('docs/small_batch_study.md', 'MABN costs nothing at 32 ({}%)', [
        small('MABN + ConvWC', '32').split(' ± ')[0]]),
    ('docs/small_batch_study.md', '**GN matches BN at 32** ({}%)', [
        small('GN', 'any (per sample)')]),
    ('docs/small_batch_study.md', 'as it should be: {}% against {}%', [
        small('PortableSyncBN, 2 processes x 2', '4 (2 x 2 processes)'), small('BN', '4')]),
    ('docs/small_batch_study.md', 'slower here ({} s against {} s)', [
        small('PortableSyncBN, 2 processes x 2', '4 (2 x 2 processes)', 's per run'),
        small('BN', '4', 's per run')]),
    ('docs/small_batch_study.md', 'penalty from 6.8 to 1.0 points ({}% against {}% at 32)', [
        small('BN, fine-tuned', '2').split(' ± ')[0],
        small('BN, fine-tuned', '32').split(' ± ')[0]]),
    ('docs/small_batch_study.md', 'lands between them ({}%)', [small('EvalBN, fine-tuned', '2')]),
    # docs/det_small_batch_study.md
    ('docs/det_small_batch_study.md', '`configs/toy/retinanet_r18_fpn_mabn_2img_toy.py`): {} ({} '
     'seeds), seeds {}-{}, every seed above every BN-at-2 seed ({} ({} seeds), {}-{}), and {}x '
     'BN at 8 ({} ({} seeds);', [
         det('mabn2_late'), det('mabn2_late', 'seeds'), *det_seed_range('mabn2_late'),
         det('bn2'), det('bn2', 'seeds'), *det_seed_range('bn2'),
         in_text(DET, 'mabn2_late / bn8: {}'), det('bn8'), det('bn8', 'seeds')]),
    ('docs/det_small_batch_study.md', 'No gradient spike (max {}, BN at 2: {})', [
        det('mabn2_late', 'max grad norm'), det('bn2', 'max grad norm')]),
    ('docs/det_small_batch_study.md', 'reaches {} ({} seeds), as high as the late start', [
        det('mabn2_batch'), det('mabn2_batch', 'seeds')]),
    ('docs/det_small_batch_study.md', 'the gain is gone, {} ({} seeds), with a gradient spike to '
     '{}.', [det('mabn2'), det('mabn2', 'seeds'), det('mabn2', 'max grad norm')]),
    ('docs/det_small_batch_study.md', '(`bn2_convwc`: {}, seeds {} and {}, against BN\'s {} and {} '
     'and the batch-statistics MABN\'s {} and {} on the same seeds)', [
         det('bn2_convwc'), det_seed('bn2_convwc', 0), det_seed('bn2_convwc', 1),
         det_seed('bn2', 0), det_seed('bn2', 1), det_seed('mabn2_batch', 0),
         det_seed('mabn2_batch', 1)]),
    ('docs/det_small_batch_study.md', 'is no better than BN: {} (seeds {} and {}, BN\'s {} and {})',
     [det('bn2_m002'), det_seed('bn2_m002', 0), det_seed('bn2_m002', 1), det_seed('bn2', 0),
      det_seed('bn2', 1)]),
    ('docs/det_small_batch_study.md', '`mabn2_all` {} ({} seeds) and `mabn2_neck` {} ({} seed) '
     '(averages from iteration 400); `mabn2_all_late` {} ({} seeds)', [
         det('mabn2_all'), det('mabn2_all', 'seeds'), det('mabn2_neck'),
         det('mabn2_neck', 'seeds'), det('mabn2_all_late'), det('mabn2_all_late', 'seeds')]),
    ('docs/det_small_batch_study.md', '`mabn2_all_lvl_late` {} (seeds {} and {}), above every '
     'seed of the backbone-only recipe (`mabn2_late`, {}-{})', [
         det('mabn2_all_lvl_late'), det_seed('mabn2_all_lvl_late', 0),
         det_seed('mabn2_all_lvl_late', 1), *det_seed_range('mabn2_late')]),
    ('docs/det_small_batch_study.md', 'largest gradient norm {} against {} shared', [
        det('mabn2_all_lvl_late', 'max grad norm'), det('mabn2_all_late', 'max grad norm')]),
    ('docs/det_small_batch_study.md', '(`mabn2_all_lvl`, {}, gradient norm up to {})', [
        det('mabn2_all_lvl'), det('mabn2_all_lvl', 'max grad norm')]),
    ('docs/det_small_batch_study.md', '`bn8_head_lvl` {} against `bn8_head` {} (seeds {}-{} '
     'against {}-{}), both far above BN in the backbone only (`bn8`, {})', [
         det('bn8_head_lvl'), det('bn8_head'), *det_seed_range('bn8_head_lvl'),
         *det_seed_range('bn8_head'), det_mean('bn8')]),
    ('docs/det_small_batch_study.md', '`bn2_head_lvl` {} against `bn2_head` {} (both above '
     '`bn2`, {})', [det('bn2_head_lvl'), det('bn2_head'), det_mean('bn2')]),
    ('docs/det_small_batch_study.md', 'the late start works: {} (seeds {} and {})', [
        det('mabn2_neck_late'), det_seed('mabn2_neck_late', 0), det_seed('mabn2_neck_late', 1)]),
    ('docs/det_small_batch_study.md', '**GN at 2 is the best from-scratch row at 2 images** '
     '({} ({} seeds))', [
        det('gn2'), det('gn2', 'seeds')]),
    ('docs/det_small_batch_study.md', '(`syncbn4x2`, {}, {} seeds) was part of it', [
        det('syncbn4x2'), det('syncbn4x2', 'seeds')]),
    ('docs/det_small_batch_study.md', 'the row gains {}, {} ({} seeds, {}-{})', [
        difference(det_mean('syncbn4x2_global'), det_mean('syncbn4x2')),
        det('syncbn4x2_global'), det('syncbn4x2_global', 'seeds'),
        *det_seed_range('syncbn4x2_global')]),
    ('docs/det_small_batch_study.md', 'But BN at 8 is {} ({} seeds, {}-{}): the fixed row is {} '
     'below it', [det('bn8'), det('bn8', 'seeds'), *det_seed_range('bn8'),
                  difference(det_mean('bn8'), det_mean('syncbn4x2_global'))]),
    ('docs/det_small_batch_study.md', 'checkpoint (seeds 1, 2: {} and {}) reaches {} ({} seeds)', [
        det_seed('bn8', 1), det_seed('bn8', 2), det('evalbn2'), det('evalbn2', 'seeds')]),
    ('docs/det_small_batch_study.md', '(`mabn2_late`, max gradient norm {} against `mabn2`\'s {})',
     [det('mabn2_late', 'max grad norm'),
      str(Decimal(det('mabn2', 'max grad norm')).quantize(Decimal(1), ROUND_HALF_UP))]),
]

# tables a doc copies from a report: (doc, its section, report, the report's section, key
# columns); every row of the doc's tables there is a row of the report's, equal in every
# column both have
TABLE_COPIES = [
    ('docs/det_small_batch_study.md', 'The table', DET, DET_SECTION, ('row',)),
    ('docs/det_small_batch_study.md', 'Diagnosis', DIAG, '', ('variant', 'seed')),
    ('docs/small_batch_study.md', 'Results', SMALL, '', ('method', 'norm batch')),
    ('docs/benchmarks.md', 'Small-batch study', SMALL, '', ('method', 'norm batch')),
    ('docs/deploy.md', 'Cost in onnxruntime', EXPORT, 'Summary', ('variant',)),
]
# goal lines of the detection study's report a doc repeats word for word
GOAL_LINE = re.compile(r'^\w+ minus bn2: .*$', re.M)


def _claim_id(claim):
    return f'{claim[0]}: {claim[1][:50]}'


@pytest.mark.parametrize('doc, template, reported', CLAIMS, ids=[_claim_id(c) for c in CLAIMS])
def test_quoted_figure_equals_the_report(doc, template, reported):
    matches = list(re.finditer(_pattern(template), flat(doc)))
    assert matches, f'{doc} no longer says {template!r}: update the doc or this test'
    for m in matches:
        quoted = m.groups()
        assert len(quoted) == len(reported)
        wrong = [(q, r) for q, r in zip(quoted, reported) if not agrees(q, r)]
        assert not wrong, f'{doc}: {m.group(0)!r} quotes (doc, report) {wrong}'


@pytest.mark.parametrize('doc, doc_section, report, section, keys', TABLE_COPIES,
                         ids=[f'{c[0]} <- {c[2]}' for c in TABLE_COPIES])
def test_copied_table_rows_equal_the_report(doc, doc_section, report, section, keys):
    def key(row):
        return tuple(row[k].strip('*') for k in keys)

    reported = {key(r): r for sec, header, rows in tables(report)
                if section in sec and set(keys) <= set(header) for r in rows}
    copies = [(header, r) for sec, header, rows in tables(doc)
              if doc_section in sec and set(keys) <= set(header) for r in rows]
    assert copies, f'{doc} has no table under {doc_section!r}'
    for header, row in copies:
        assert key(row) in reported, f'{doc}: row {key(row)} is not in {report}'
        source = reported[key(row)]
        for column in header:
            if column in source:
                assert row[column].strip('*') == source[column].strip('*'), \
                    f'{doc}: {key(row)} {column}: {row[column]!r}, {report}: {source[column]!r}'


def test_repeated_goal_lines_equal_the_report():
    reported = set(GOAL_LINE.findall(text(DET)))
    quoted = GOAL_LINE.findall(text('docs/det_small_batch_study.md'))
    assert quoted and set(quoted) <= reported, set(quoted) - reported


def _records():
    with open(osp.join(REPO, DET_JSON)) as f:
        return [r for r in json.load(f) if r.get('recipe') == 'adamw' and
                r.get('ref_iters') == 600]


def test_the_detection_table_is_the_json():
    """Every row of the report's table: its seeds and mean ± std are the json records'."""
    by_row = {}
    for r in _records():
        by_row.setdefault(r['row'], []).append(r['bbox_mAP'])
    rows = [r for sec, _, rows in tables(DET) if DET_SECTION in sec for r in rows]
    assert rows
    for row in rows:
        values = by_row[row['row']]
        mean = f'{statistics.fmean(values):.3f}'
        want = f'{mean} ± {statistics.stdev(values):.3f}' if len(values) > 1 else mean
        assert (row['bbox mAP'], row['seeds']) == (want, str(len(values))), row['row']


"""The small-batch study: accuracy vs normalisation batch size for each norm layer.

    python -m benchmarks.small_batch_study --out-dir docs/img \\
        --out-md docs/small_batch_study_results.md [--seeds 3] [--jobs 2]
        [--methods KEY ...] [--set FIELD=VALUE ...] [--tiny]

Trains a small ResNet on synthetic 32x32 shape images with SGD batch 32 and
normalisation batch 2, 4, 16 or 32 (ghost batches: every norm layer normalises each
chunk of the SGD batch separately), for each method in ``benchmarks/study/runs.py``
(``METHODS``) and seed, then writes ``--out-md`` (tables, the gap MABN closes), the
raw per-run records next to it (same name, ``.json``) and two PNG plots under
``--out-dir``. Single-process runs go to ``--jobs`` worker processes of
``threads`` torch threads each; multi-process runs (PortableSyncBN) follow, one at a
time. ``--set FIELD=VALUE`` overrides a ``StudyConfig`` field (tuples as ``16,32``);
``--tiny`` is a seconds-long smoke-test size. Design and discussion:
``docs/small_batch_study.md``.
"""
import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch
import torch.multiprocessing as mp

from benchmarks.bench_utils import write_text
from benchmarks.study import report
from benchmarks.study.runs import METHODS, METHODS_BY_KEY, StudyConfig, run_single, run_synced

TINY = dict(widths=(4, 8, 8, 8), num_train=96, num_pretrain=96, num_test=64, steps=12,
            warmup_steps=3, pretrain_steps=6, finetune_steps=6, finetune_warmup_steps=2,
            reestimate_batches=1, log_every=2, gn_groups=2, sync_timeout=120.0)


def parse_overrides(items):
    """``FIELD=VALUE`` strings -> typed ``StudyConfig`` keyword arguments."""
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    defaults = StudyConfig()
    out = {}
    for item in items:
        name, sep, value = item.partition('=')
        if not sep or name not in fields:
            raise SystemExit(f'--set expects FIELD=VALUE with FIELD one of '
                             f'{sorted(fields)}, got {item!r}')
        default = getattr(defaults, name)
        if isinstance(default, tuple):
            out[name] = tuple(int(v) for v in value.split(','))
        else:
            out[name] = type(default)(value)
    return out


def _pool_init(threads):
    torch.set_num_threads(threads)


def _pool_job(config, key, seed, init_state):
    return run_single(config, METHODS_BY_KEY[key], seed, init_state)


def _cost(config, method):
    """Relative cost for scheduling: layer calls per step times steps."""
    steps = config.schedule(method.phase)[0]
    return steps * config.batch / (method.norm_batch or config.batch)


def run_study(config, methods, seeds, jobs, on_record):
    """Run every (method, seed); ``on_record(record)`` after each. Pre-training runs
    first (fine-tuning starts from the same seed's pre-trained weights), the other
    single-process runs costliest first, on ``jobs`` workers (0: in this process);
    then the multi-process runs one at a time."""
    keys = {m.key for m in methods}
    if any(m.phase == 'finetune' for m in methods):
        keys.add('pretrain')
    methods = [m for m in METHODS if m.key in keys]
    finetune = [m for m in methods if m.phase == 'finetune']
    first = sorted((m for m in methods if m.procs == 1 and m.phase != 'finetune'),
                   key=lambda m: (m.phase != 'pretrain', -_cost(config, m)))
    queue = [(m, s, None) for m in first for s in seeds]

    def finished(record, state):
        on_record(record)
        if record['phase'] == 'pretrain':
            return [(m, record['seed'], state) for m in finetune]
        return []

    if jobs == 0:
        while queue:
            method, seed, state = queue.pop(0)
            queue += finished(*run_single(config, method, seed, state))
    else:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context('spawn'),
                                 initializer=_pool_init, initargs=(config.threads, )) as pool:
            running = {pool.submit(_pool_job, config, m.key, s, st) for m, s, st in queue}
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    for m, s, st in finished(*future.result()):
                        running.add(pool.submit(_pool_job, config, m.key, s, st))
    for method in (m for m in methods if m.procs > 1):
        for seed in seeds:
            on_record(run_synced(config, method, seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out-dir', default='docs/img', help='where the PNG plots go')
    parser.add_argument('--out-md', default='docs/small_batch_study_results.md',
                        help='results page; the raw records go next to it as .json')
    parser.add_argument('--seeds', type=int, default=3, help='seeds 0 .. N-1 per method')
    parser.add_argument('--jobs', type=int, default=2,
                        help='parallel single-process runs (0: in this process)')
    parser.add_argument('--methods', nargs='+', choices=[m.key for m in METHODS],
                        default=[m.key for m in METHODS])
    parser.add_argument('--set', nargs='+', default=[], metavar='FIELD=VALUE',
                        help='override StudyConfig fields')
    parser.add_argument('--tiny', action='store_true', help='smoke-test size (seconds)')
    args = parser.parse_args(argv)

    config = StudyConfig(**{**(TINY if args.tiny else {}), **parse_overrides(args.set)})
    seeds = list(range(args.seeds))
    torch.set_num_threads(config.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out_md) or '.', exist_ok=True)
    json_path = os.path.splitext(args.out_md)[0] + '.json'
    command = ['python', '-m', 'benchmarks.small_batch_study'] + sys.argv[1:]
    meta = dict(command=' '.join(shlex.quote(a) for a in command),
                date=datetime.date.today().isoformat(), seeds=seeds, jobs=args.jobs,
                cpus=os.cpu_count(), torch=torch.__version__,
                load_start=os.getloadavg()[0], config=dataclasses.asdict(config))
    records = []
    start = time.perf_counter()

    def on_record(record):
        records.append(record)
        print(f'[{time.perf_counter() - start:7.0f} s] {record["key"]:>11} seed '
              f'{record["seed"]}: acc {100 * record["acc"]:.1f}%'
              f'{" DIVERGED" if record["diverged"] else ""}, {record["seconds"]:.0f} s',
              flush=True)
        # partial results survive an interruption
        write_text(json_path, json.dumps(dict(meta=meta, records=records), indent=1))

    methods = [METHODS_BY_KEY[k] for k in args.methods]
    run_study(config, methods, seeds, args.jobs, on_record)
    meta.update(wall_seconds=time.perf_counter() - start, load_end=os.getloadavg()[0],
                runs=len(records))
    write_text(json_path, json.dumps(dict(meta=meta, records=records), indent=1))

    rows = report.summarise(records, config.batch)
    plots = {'accuracy vs normalisation batch':
             os.path.join(args.out_dir, 'small_batch_study.png'),
             'training loss and gradient norm':
             os.path.join(args.out_dir, 'small_batch_study_training.png')}
    report.plot_accuracy(rows, config.batch, plots['accuracy vs normalisation batch'])
    report.plot_training(records, config.log_every, plots['training loss and gradient norm'])
    write_text(args.out_md, report.markdown(rows, meta, plots, args.out_md) + '\n')
    print(f'wrote {args.out_md}, {json_path}, {", ".join(plots.values())} '
          f'in {meta["wall_seconds"] / 60:.1f} min')


if __name__ == '__main__':
    main()

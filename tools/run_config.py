"""Loading and checking a run's config for ``tools/train.py`` and ``tools/test.py``,
building and closing their run.

mmdet 3.x conventions (``--work-dir``, ``--cfg-options``, ``--launcher``); on top of them,
mistakes that would otherwise surface minutes later deep inside the Runner are caught
before anything is built: a missing config file, a missing dataset, an unknown norm type.
"""
import difflib
import glob
import os
import os.path as osp

from cli import MissingInput, UnknownName, UnsupportedHere

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from torch import nn

SYNTHETIC_HINT = ('generate the synthetic dataset with: '
                  'python tools/make_synthetic.py {root}')
COCO_HINT = ('download COCO 2017 (train2017/, val2017/, annotations/) to {root}, '
             'or point data_root at it with --cfg-options')


def add_common_args(parser):
    """The arguments train.py and test.py share, named as in mmdet's tools."""
    parser.add_argument('--work-dir', help='directory for logs and checkpoints '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, key=value pairs in xxx=yyy format '
        '(e.g. model.backbone.norm_cfg.type=MABN)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
                        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


def read_config(path, cfg_options=None):
    """The config file at ``path`` with ``cfg_options`` merged (MissingInput if absent)."""
    if not osp.isfile(path):
        raise MissingInput(f'config file not found: {path!r}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_config(args):
    """Read ``args.config``, apply ``--cfg-options``, launcher and work dir; return it."""
    if not osp.isfile(args.config):
        raise MissingInput(f'config file not found: {args.config!r}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = read_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    check_norm_types(cfg.get('model', {}))
    return cfg


def _norm_cfgs(node, path):
    """Yield (config path, norm config dict) for every ``*norm_cfg`` entry below ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f'{path}.{key}'
            if key.endswith('norm_cfg') and isinstance(value, dict) and 'type' in value:
                yield child, value
            yield from _norm_cfgs(value, child)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _norm_cfgs(value, f'{path}[{i}]')


def _is_norm_class(cls):
    norm_bases = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    return isinstance(cls, type) and (issubclass(cls, norm_bases) or 'Norm' in cls.__name__)


def _registered_norm_names(registry):
    names = set()
    while registry is not None:
        names.update(name for name, cls in registry.module_dict.items() if _is_norm_class(cls))
        registry = registry.parent
    return sorted(names)


def check_norm_types(model_cfg):
    """Raise a KeyError naming the config path if a norm ``type`` is not registered."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    for path, norm_cfg in _norm_cfgs(model_cfg, 'model'):
        norm_type = norm_cfg['type']
        if not isinstance(norm_type, str) or MMDET_MODELS.get(norm_type) is not None:
            continue
        known = _registered_norm_names(MMDET_MODELS)
        close = difflib.get_close_matches(norm_type, known, n=3)
        hint = f' Did you mean {", ".join(close)}?' if close else ''
        raise UnknownName(f'{path}.type={norm_type!r} is not a registered norm layer.{hint} '
                       f'Registered norm layers: {", ".join(known)}. mmdet_bnplug\'s layers '
                       'are registered by importing mmdet_bnplug (custom_imports).')


def _datasets(dataset_cfg):
    """The leaf dataset configs of a (possibly wrapped) dataset config."""
    if 'datasets' in dataset_cfg:
        for sub in dataset_cfg['datasets']:
            yield from _datasets(sub)
    elif 'dataset' in dataset_cfg:
        yield from _datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def check_datasets(cfg, loader_keys):
    """Raise FileNotFoundError, saying how to get the data, if a dataset's files are absent."""
    for key in loader_keys:
        loader = cfg.get(key)
        if not loader:
            continue
        for dataset in _datasets(loader['dataset']):
            root = dataset.get('data_root') or ''
            ann_file = dataset.get('ann_file') or ''
            ann_path = ann_file if osp.isabs(ann_file) else osp.join(root, ann_file)
            missing = [p for p in (root, ann_path) if p and not osp.exists(p)]
            if missing:
                hint = SYNTHETIC_HINT if 'synthetic' in ann_path else COCO_HINT
                raise MissingInput(
                    f'{key}.dataset: {missing[0]!r} not found; '
                    + hint.format(root=root or osp.dirname(ann_path)))


def _latest_checkpoint(work_dir):
    """The checkpoint mmengine's ``last_checkpoint`` file in ``work_dir`` names (relative
    to the current directory when inside it), if it exists, else None."""
    try:
        with open(osp.join(work_dir, 'last_checkpoint')) as f:
            latest = f.read().strip()
    except OSError:
        return None
    if not osp.isfile(latest):
        return None
    inside = osp.abspath(latest).startswith(os.getcwd() + os.sep)
    return osp.relpath(latest) if inside else latest  # mmengine writes it absolute


def check_checkpoint_path(path, option):
    """MissingInput if a local checkpoint ``path`` (given as ``option``) does not exist,
    with the option to pass instead: the latest checkpoint of the run in ``path``'s
    directory (e.g. a shortened run of the config that writes it), else a file of the
    same name under ``work_dirs/``. URLs (``scheme://``) are left to mmengine."""
    if not path or '://' in path or osp.isfile(path):
        return
    latest = _latest_checkpoint(osp.dirname(path) or '.')
    found = [] if latest else sorted(
        glob.glob(osp.join('work_dirs', '**', osp.basename(path)), recursive=True))
    if latest:
        hint = (f'; the latest checkpoint of that run is {latest}: pass '
                f'--cfg-options {option}={latest}')
    elif found:
        hint = f'; found {found[0]}: pass --cfg-options {option}={found[0]}'
    else:
        hint = ('; train the run that writes it first, or pass --cfg-options '
                f'{option}=<checkpoint>')
    raise MissingInput(f'{option}={path!r} not found{hint}')


def use_amp(cfg):
    """``--amp``: mmengine's AmpOptimWrapper (fp16, dynamic loss scaling) with CUDA;
    without it, bf16 autocast on the CPU (``AutocastOptimWrapper``, no loss scaling)."""
    if torch.cuda.is_available():
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        return
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper not in ('OptimWrapper', 'AutocastOptimWrapper'):
        raise UnsupportedHere(f'--amp on the CPU replaces optim_wrapper.type=OptimWrapper; '
                              f'this config uses {wrapper!r}')
    cfg.optim_wrapper.update(type='AutocastOptimWrapper', dtype='bfloat16',
                             device_type='cpu')
    print('--amp without CUDA: bf16 autocast on the CPU (AutocastOptimWrapper)', flush=True)


def build_runner(cfg):
    """The config's runner: ``runner_type`` if it names one, else mmengine's Runner."""
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def close_distributed():
    """After a successful distributed run: wait for every rank, then destroy the process
    group, so that its gloo threads stop while the interpreter is still alive. Left to
    interpreter exit, a rank can abort ("terminate called without an active exception")
    and the launcher reports the finished run as failed. No-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

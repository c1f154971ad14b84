"""What the study trains (``StudyConfig``, ``METHODS``) and one training run of each.

A run: a ``SmallResNet`` trained with SGD (Nesterov momentum 0.9, weight decay on conv
and linear weights only, linear learning-rate warm-up then cosine decay to 0) on the
study's images at SGD batch ``config.batch``, with every norm layer wrapped in
``GhostNorm(norm_batch)``; then test accuracy in eval mode. Runs are deterministic for
(config, method, seed): the seed sets the initialisation and the batch order, the data
are the same for every run.
"""
import copy
import dataclasses
import math
import time
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mmdet_bnplug  # noqa: F401  registers MABN, ConvWC, EvalBN, PortableSyncBN
from mmdet_bnplug.layers.portable_sync_bn import PortableSyncBN
from mmdet_bnplug.testing.gloo import run_gloo

from .data import NUM_CLASSES, make_split, to_input
from .model import GhostNorm, SmallResNet


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Sizes and schedules; object sizes in pixels, steps are SGD steps."""
    batch: int = 32  # SGD batch (over all processes)
    widths: Tuple[int, ...] = (16, 32, 64, 128)
    image_size: int = 32
    object_size: Tuple[int, int] = (12, 24)  # the target task
    pretrain_object_size: Tuple[int, int] = (16, 30)  # the related pre-training task
    num_train: int = 10000
    num_pretrain: int = 10000
    num_test: int = 2000
    data_seed: int = 0
    steps: int = 800
    lr: float = 0.03  # best of 0.03, 0.05, 0.1 for BN at norm batch 32 (seed 0)
    warmup_steps: int = 100
    weight_decay: float = 5e-4
    pretrain_steps: int = 600
    finetune_steps: int = 400
    finetune_lr: float = 0.01
    finetune_warmup_steps: int = 50
    mabn_renorm_frac: float = 0.2  # MABN renormalises from this fraction of the steps on
    gn_groups: int = 8
    reestimate_batches: int = 40  # x 64 training images, for re-estimated BN statistics
    log_every: int = 25
    threads: int = 1  # torch threads per training process
    sync_timeout: float = 3600.0  # s, bound on one multi-process run

    def schedule(self, phase: str) -> Tuple[int, float, int]:
        """(steps, peak learning rate, warm-up steps) of a phase."""
        if phase == 'pretrain':
            return self.pretrain_steps, self.lr, self.warmup_steps
        if phase == 'finetune':
            return self.finetune_steps, self.finetune_lr, self.finetune_warmup_steps
        return self.steps, self.lr, self.warmup_steps

    def train_split(self, phase: str):
        if phase == 'pretrain':
            return make_split(self.num_pretrain, self.data_seed + 2,
                              *self.pretrain_object_size, self.image_size)
        return make_split(self.num_train, self.data_seed, *self.object_size,
                          self.image_size)

    def test_split(self):
        return make_split(self.num_test, self.data_seed + 1, *self.object_size,
                          self.image_size)


@dataclasses.dataclass(frozen=True)
class Method:
    """A norm layer at a normalisation batch. ``norm_batch`` is per process (None:
    batch-independent, the whole SGD batch); ``procs`` > 1 synchronises the ghost
    chunks of that many processes. ``phase``: 'scratch', 'pretrain' (on the related
    task, feeds 'finetune'), 'finetune' (from the same seed's pretrained weights, new
    head)."""
    key: str
    label: str
    norm: str
    norm_batch: Optional[int]
    procs: int = 1
    phase: str = 'scratch'

    def effective_norm_batch(self, batch: int) -> int:
        """Samples behind each batch statistic."""
        return batch if self.norm_batch is None else self.norm_batch * self.procs


METHODS = (
    Method('bn2', 'BN', 'BN', 2),
    Method('bn4', 'BN', 'BN', 4),
    Method('bn16', 'BN', 'BN', 16),
    Method('bn32', 'BN', 'BN', 32),
    Method('mabn2', 'MABN + ConvWC', 'MABN', 2),
    Method('mabn32', 'MABN + ConvWC', 'MABN', 32),
    Method('gn', 'GN', 'GN', None),
    Method('syncbn2x2', 'PortableSyncBN, 2 processes x 2', 'PortableSyncBN', 2, procs=2),
    Method('pretrain', 'BN pre-training (related task)', 'BN', 32, phase='pretrain'),
    Method('ft_bn2', 'BN, fine-tuned', 'BN', 2, phase='finetune'),
    Method('ft_evalbn2', 'EvalBN, fine-tuned', 'EvalBN', 2, phase='finetune'),
    Method('ft_bn32', 'BN, fine-tuned', 'BN', 32, phase='finetune'),
)
METHODS_BY_KEY = {m.key: m for m in METHODS}


def layer_cfgs(config: StudyConfig, method: Method):
    """``(norm_cfg, conv_cfg, ghost_size)`` of a method's model.

    MABN at normalisation batch b inside SGD batch B (per process): each ghost chunk
    is one layer call, so the layer is called ``B // b`` times per SGD step and
    ``buffer_size = B // b`` (the paper's real batch / norm batch) averages the ghost
    chunks of roughly the last step; ``warmup_iters`` and ``renorm_iters`` are counted
    in layer calls, i.e. ``B // b`` per step.
    """
    local_batch = config.batch // method.procs
    if method.norm_batch is not None and local_batch % method.norm_batch:
        raise ValueError(f'{method.key}: norm_batch {method.norm_batch} must divide the '
                         f'per-process batch {local_batch}')
    ghost = method.norm_batch if method.norm_batch and method.norm_batch < local_batch else None
    conv_cfg = None
    if method.norm == 'GN':
        norm_cfg = dict(type='GN', num_groups=config.gn_groups)
    elif method.norm == 'MABN':
        calls = local_batch // method.norm_batch
        steps, _, warmup = config.schedule(method.phase)
        norm_cfg = dict(type='MABN', buffer_size=calls, warmup_iters=calls * warmup,
                        renorm_iters=calls * int(config.mabn_renorm_frac * steps))
        conv_cfg = dict(type='ConvWC')
    else:
        norm_cfg = dict(type=method.norm)
    return norm_cfg, conv_cfg, ghost


def build_model(config: StudyConfig, method: Method) -> SmallResNet:
    norm_cfg, conv_cfg, ghost = layer_cfgs(config, method)
    return SmallResNet(config.widths, NUM_CLASSES, norm_cfg, conv_cfg, ghost)


def _optimizer(model: nn.Module, config: StudyConfig) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD([dict(params=decay, weight_decay=config.weight_decay),
                            dict(params=no_decay, weight_decay=0.0)],
                           lr=0.0, momentum=0.9, nesterov=True)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _batches(num: int, batch: int, generator: torch.Generator):
    """Global SGD batches of sample indices, epoch after epoch of random permutations."""
    while True:
        perm = torch.randperm(num, generator=generator)
        for start in range(0, num - batch + 1, batch):
            yield perm[start:start + batch]


def _all_average(model: nn.Module, loss: torch.Tensor, world: int) -> torch.Tensor:
    """Average every gradient and the loss over the processes in one all_reduce (as
    DDP does); returns the averaged loss."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[-1]


def train(config: StudyConfig, method: Method, seed: int, init_state=None, rank=0, world=1):
    """Train one model; returns ``(model, record)`` (record: curves, time, divergence).

    With ``world > 1`` (a gloo group is initialised), each process takes its share of
    every global batch so that ghost chunk k of every process forms the k-th
    normalisation group: the same groups as ``norm_batch * world`` in one process.
    """
    steps, peak_lr, warmup = config.schedule(method.phase)
    images, labels = config.train_split(method.phase)
    torch.manual_seed(seed)
    model = build_model(config, method)
    if init_state is not None:  # pretrained weights and statistics, fresh head
        backbone = {k: v for k, v in init_state.items() if not k.startswith('fc.')}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith('fc.') for k in missing):
            raise RuntimeError(f'pretrained state does not fit {method.key}: '
                               f'missing {missing}, unexpected {unexpected}')
    model.train()
    optimizer = _optimizer(model, config)
    batches = _batches(len(images), config.batch, torch.Generator().manual_seed(seed))
    local = config.batch // world
    losses, grad_norms, first_losses, diverged = [], [], [], False
    start = time.perf_counter()
    for step in range(steps):
        lr = learning_rate(step, steps, peak_lr, warmup)
        for group in optimizer.param_groups:
            group['lr'] = lr
        idx = next(batches)
        if world > 1:  # process r: the r-th slice of every normalisation group
            idx = idx.view(-1, world, method.norm_batch or local)[:, rank].reshape(-1)
        loss = F.cross_entropy(model(to_input(images[idx])), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            loss = _all_average(model, loss, world)
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), float('inf')))
        loss = float(loss.detach())
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            diverged = True
            break
        optimizer.step()
        losses.append(loss)
        grad_norms.append(grad_norm)
        if len(first_losses) < 5:
            first_losses.append(loss)
    seconds = time.perf_counter() - start
    every = config.log_every
    record = dict(
        key=method.key, seed=seed, phase=method.phase, norm=method.norm,
        norm_batch=method.effective_norm_batch(config.batch), procs=world,
        steps=len(losses), diverged=diverged, seconds=round(seconds, 2),
        first_losses=first_losses,
        loss_curve=[sum(losses[i:i + every]) / len(losses[i:i + every])
                    for i in range(0, len(losses), every)],
        grad_norm_curve=[max(grad_norms[i:i + every]) for i in range(0, len(grad_norms), every)])
    return model, record


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 500) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = sum(int((model(to_input(images[i:i + batch])).argmax(1)
                       == labels[i:i + batch]).sum()) for i in range(0, len(images), batch))
    return correct / len(images)


@torch.no_grad()
def reestimated_accuracy(model: nn.Module, config: StudyConfig) -> Optional[float]:
    """Accuracy after replacing BN's running statistics by averages over
    ``config.reestimate_batches`` training batches of 64 (no ghost split), or None
    when the model has no BN layer whose statistics are estimated in training
    (``nn.BatchNorm2d``, ``PortableSyncBN``). Tells train-time noise apart from noisy
    running statistics. Call without an initialised process group."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if type(m) in (nn.BatchNorm2d, PortableSyncBN)]
    if not bns:
        return None
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    for wrapper in model.modules():
        if isinstance(wrapper, GhostNorm):
            wrapper.ghost_size = None
    images, _ = config.train_split('scratch')
    model.train()
    for i in range(config.reestimate_batches):
        model(to_input(images[i * 64:(i + 1) * 64]))
    return accuracy(model, *config.test_split())


def evaluate(model: nn.Module, config: StudyConfig, record: dict) -> dict:
    record = dict(record, acc=accuracy(model, *config.test_split()))
    record['acc_reestimated'] = (None if record['phase'] != 'scratch'
                                 else reestimated_accuracy(model, config))
    return record


def run_single(config: StudyConfig, method: Method, seed: int, init_state=None):
    """One single-process run: ``(record, state_dict)``, state only for pre-training."""
    model, record = train(config, method, seed, init_state)
    record = evaluate(model, config, record)
    return record, (model.state_dict() if method.phase == 'pretrain' else None)


def _synced_train(rank, world, config, method, seed):
    """One rank of a multi-process run; rank 0 returns ``(model, record)``."""
    model, record = train(config, method, seed, rank=rank, world=world)
    return (model, record) if rank == 0 else None


def run_synced(config: StudyConfig, method: Method, seed: int) -> dict:
    """A run on ``method.procs`` gloo processes of ``config.threads`` threads each,
    evaluated here on rank 0's model (every rank ends with the same weights and
    statistics). Every process is killed if the run is not done within
    ``config.sync_timeout`` s."""
    results = run_gloo(_synced_train, method.procs, (config, method, seed),
                       timeout=config.sync_timeout,
                       pg_timeout=min(300.0, config.sync_timeout), threads=config.threads)
    model, record = results[0]
    return evaluate(model, config, record)

"""PortableSyncBN: batch norm over the concatenated batch of a group of ranks, any device.

In training mode, with an initialised process group of more than one rank in the layer's
group, forward and backward compute exactly what ``nn.BatchNorm*d`` computes on the
concatenation of the group's batches, whatever each rank's batch size (zero included).
Each call costs one collective in the forward (gathering per-rank count, mean and sum of
squared deviations, combined exactly) and one in the backward (gathering per-rank sums of
the gradient statistics, added up in rank order); both are ordinary ``torch.distributed``
calls, so gloo on CPU and nccl on CUDA both work. Otherwise (eval mode, no process group,
group of one rank) it is plain BN and communicates nothing.

Ranks that disagree get an error, not a gloo abort or a hang. Once per layer and
statistics dtype, before its first synchronised gather, the group exchanges a fixed-size
row (the handshake, eager mode only); a channel count or statistics dtype that differs
between ranks is a ``ValueError`` on every rank naming the layer and each rank's values.
In eager mode on the CPU every wait for the group is bounded by ``sync_timeout`` (the
process group's timeout if shorter), as a timeout of the collective itself: a rank in
eval mode while another trains, or a rank that runs another branch or died, makes the
waiting rank raise, naming the layer and the likely causes, and nothing is left pending.

On CPU (eager) the per-call arithmetic is the compiled kernels of
``ops/csrc/sync_bn_cpu.cpp`` (``cpu_kernels``); elsewhere, under torch.compile, or
without the build, the PyTorch implementation here computes the same.
"""
import itertools
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.checks import check_bn_args, check_real
from ..utils.recompute import inside_backward
from ..utils.tensors import cast, channel_view, reduce_dims, stat_dtype

try:  # the compiled CPU kernels (setup.py builds them)
    from ..ops import _sync_bn_cpu as cpu_kernels
except ImportError:
    cpu_kernels = None

# group_size -> (default process group it was made under, this rank's subgroup)
_SUBGROUPS = {}


def _centred(x, mean):
    """``x - mean`` per channel as a new tensor in the statistics' dtype."""
    return x.to(mean.dtype) - channel_view(mean, x.dim())


def _rank_list(ranks):
    """``[0, 1, 2, 5]`` -> ``'ranks 0-2, 5'``; one rank: ``'rank 3'``."""
    runs = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ', '.join(f'{a}' if a == b else f'{a}, {b}' if b == a + 1 else f'{a}-{b}'
                     for a, b in runs)
    return f'rank{"s" if len(ranks) > 1 else ""} {text}'


def _group_timeout(group, device):
    """The process group's own timeout for collectives on ``device`` (timedelta), or None
    where the backend does not say."""
    try:
        return group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _wait_bound(layer, group, device):
    """How long ``layer``'s collective on ``device`` may wait for ``group`` (seconds), or
    None for the process group's own timeout: ``layer.sync_timeout`` on the CPU, capped by
    the group's timeout. On other devices (nccl) a bounded wait would block the host on
    every call, so the group's timeout and torch's watchdog apply."""
    if layer.sync_timeout is None or device.type != 'cpu':
        return None
    own = _group_timeout(group, device)
    return layer.sync_timeout if own is None else min(layer.sync_timeout, own.total_seconds())


def _sync_failure(layer, what, group, waited, bound, err):
    """The error for a failed collective: which layer, rank and rows, how long it waited,
    and why that usually happens."""
    limit = ("the process group's timeout" if bound is None
             else f'{bound:g} s (sync_timeout={layer.sync_timeout}, or the '
             "process group's timeout if shorter)")
    ranks = _rank_list(dist.get_process_group_ranks(group))
    return (f'{layer._sync_name()} on rank {dist.get_rank()}: waited {waited:.1f} s for '
            f'{ranks} to all_gather {what}, then the collective failed; the bound is '
            f'{limit}. In training mode every rank of the group must call the layer the '
            'same number of times in the same order (a rank with an empty batch too). '
            'Likely causes: a rank of the group is in eval mode while this one trains (eval '
            'mode communicates nothing: call train()/eval() alike on every rank), a rank '
            'runs a different model or branch, or a rank died or is stuck; a rank that is '
            'legitimately slower than that (first iteration, data loading, saving a '
            f'checkpoint) needs a larger sync_timeout. Cause: {err}')


def _all_gather(output, tensor, group, what, layer=None):
    """``output[r] = tensor`` of the group's rank r, in one all_gather. ``layer`` is the
    calling PortableSyncBN in eager mode: it bounds the wait (``_wait_bound``), and a
    failure (peer gone, timeout) becomes an error naming it and the likely causes.
    ``layer=None``: torch.distributed's call alone (what torch.compile traces)."""
    # ``all_gather_single`` replaces ``all_gather_into_tensor`` in recent torch
    public = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor
    if layer is None:
        public(output, tensor, group=group)
        return
    bound = _wait_bound(layer, group, tensor.device)
    start = time.monotonic()
    try:
        if bound is None:
            public(output, tensor, group=group)
        else:  # torch.distributed's call takes no timeout; the group's own call does
            opts = dist.distributed_c10d.AllgatherOptions()
            opts.timeout, opts.asyncOp = float(bound), False  # seconds; blocking, as torch's
            op = getattr(group, 'all_gather_single', None) or group._allgather_base
            op(output, tensor, opts).wait()
    except RuntimeError as err:
        raise RuntimeError(_sync_failure(layer, what, group, time.monotonic() - start,
                                         bound, err)) from err


def _process_group(group_size):
    """The group this rank synchronises with, or None for local BN.

    ``group_size=None`` means the whole world; otherwise consecutive blocks of
    ``group_size`` ranks. Subgroups are created once per ``group_size`` (by every rank,
    in the same order, at the first synchronised forward) and cached.
    """
    world = dist.get_world_size()
    size = world if group_size is None else group_size
    if world % size:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f'PortableSyncBN: group_size={group_size} does not divide the '
                         f'world size {world}; accepted: None or one of {divisors}')
    if size == 1:
        return None
    if size == world:
        return dist.group.WORLD
    cached = _SUBGROUPS.get(size)
    if cached is None or cached[0] is not dist.group.WORLD:
        subgroup, _ = dist.new_subgroups(group_size=size)
        cached = _SUBGROUPS[size] = (dist.group.WORLD, subgroup)
    return cached[1]


_LOW_PRECISION = (torch.float16, torch.bfloat16)
_bn_backward = torch.ops.aten.native_batch_norm_backward


def _fused_grad_input(x):
    """Whether ``dx`` is torch's one-pass SyncBN kernel (``batch_norm_backward_elemt``,
    CUDA and ROCm only, eager) rather than the two-pass combination of any device."""
    return x.device.type == 'cuda' and not torch.compiler.is_compiling()


def _local_moments(x, sd):
    """This rank's per-channel ``(mean, M2)`` (M2 = sum of squared deviations) in ``sd``.

    fp32/fp64 input: BN's own statistics kernel, one fused pass, as precise as BN's
    (compiled: ``var_mean``, which inductor makes one Welford pass).
    fp16/bf16 input: two passes in fp32 (that kernel would round the statistics to the
    input's precision)."""
    n = x.numel() // x.shape[1]
    if n == 0:
        zeros = x.new_zeros(x.shape[1], dtype=sd)
        return zeros, zeros
    x = x.detach()
    if x.dtype in _LOW_PRECISION:
        mean = x.to(sd).sum(reduce_dims(x)) / n
        return mean, _centred(x, mean).square_().sum(reduce_dims(x))
    if torch.compiler.is_compiling():  # no fake kernel for dynamic shapes; inductor fuses
        var, mean = torch.var_mean(x, reduce_dims(x), correction=0)  # this one (Welford)
        return mean.to(sd), var.to(sd) * n
    mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
    return mean, var * n


def _kernels_apply(x):
    """Whether this call uses the compiled CPU kernels (``ops/csrc/sync_bn_cpu.cpp``):
    CPU input, eager, extension built; otherwise the PyTorch implementation here."""
    return cpu_kernels is not None and x.device.type == 'cpu' and \
        not torch.compiler.is_compiling()


def _local_row(x):
    """This rank's ``(1, 2C + 1)`` row ``[count, mean, M2]`` in the statistics dtype."""
    if _kernels_apply(x):
        return cpu_kernels.local_stats(x.detach())
    mean, m2 = _local_moments(x, stat_dtype(x.dtype))
    return torch.cat([mean.new_full((1, ), x.numel() // x.shape[1]), mean, m2])[None]


def _gather_rows(local, group, what='batch statistics', layer=None):
    """Every rank's row ``local`` (``(1, K)``) as ``(ranks, K)`` in rank order, in one
    all_gather (``group=None``: this rank's). ``what`` names the rows in errors; ``layer``
    as in ``_all_gather``."""
    if group is None:
        return local
    gathered = local.new_empty(dist.get_world_size(group), local.shape[1])
    _all_gather(gathered, local, group, what, layer)
    return gathered


# The handshake row, float64: [_HANDSHAKE_MARK, layer ordinal, channels, statistics bits].
# 4 values: never the size of a forward row (2C + 1, odd); a backward row (2C) of the
# same size does not start with the mark (nor does a forward row: counts are >= 0).
_HANDSHAKE_MARK = -3.0e300
_ORDINALS = itertools.count(1)  # PortableSyncBN layers numbered as they first synchronise


def _check_agreement(layer, rows, group):
    """Raise on every rank if the handshake rows ``(ranks, 4)`` (a list) disagree."""
    marked = [row[0] == _HANDSHAKE_MARK for row in rows]
    if all(marked) and len({(row[2], row[3]) for row in rows}) == 1:
        return
    ranks = dist.get_process_group_ranks(group)
    if not all(marked):
        strays = [r for r, ok in zip(ranks, marked) if not ok]
        raise RuntimeError(
            f'{layer._sync_name()} on rank {dist.get_rank()}: {_rank_list(strays)} sent '
            "something other than this layer's handshake to the same all_gather: the ranks "
            'call collectives in different orders (a rank in eval mode while others train, '
            'or a different model or branch)')
    values = {}
    for r, (_, _, channels, bits) in zip(ranks, rows):
        values.setdefault(f'{channels:.0f} channels float{bits:.0f}', []).append(r)
    listed = '; '.join(f'{_rank_list(rs)}: {v}' for v, rs in values.items())
    message = (f'{layer._sync_name()}: the ranks of its group disagree on the channel count '
               f'or the statistics dtype, so their batch statistics cannot be combined: '
               f'{listed}. Every rank must build the same model and run it in the same '
               'dtype (statistics are float64 for float64 input, float32 otherwise).')
    ordinals = {}
    for r, row in zip(ranks, rows):
        ordinals.setdefault(f'#{row[1]:.0f}', []).append(r)
    if len(ordinals) > 1:
        message += (' The ranks are at different PortableSyncBN layers too ('
                    + '; '.join(f'{_rank_list(rs)}: {o}' for o, rs in ordinals.items())
                    + '): a rank runs a different model or branch.')
    raise ValueError(message)


def _combine(gathered):
    """Mean, biased variance ``(C,)`` and element count (0-dim) of the rows' union,
    combined exactly (Chan et al.), each rank's mean taken relative to that of the rank
    with the most values: precise when the mean is large against the spread. An empty
    union gives mean and variance 0."""
    channels = (gathered.shape[1] - 1) // 2
    counts, means, m2s = gathered[:, :1], gathered[:, 1:channels + 1], gathered[:, channels + 1:]
    total = counts.sum()
    safe = total.clamp_min(1)
    ref = means.index_select(0, counts.view(-1).argmax().view(1))[0]  # no host sync
    mean = ref + (counts * (means - ref)).sum(0) / safe
    m2 = (m2s + counts * (means - mean)**2).sum(0)
    return mean, m2 / safe, total


def global_batch_stats(x, group):
    """Mean, biased variance ``(C,)`` and element count over the group's batch.

    Each rank contributes (count, mean, M2) in one all_gather; they are combined exactly.
    ``group=None``: this rank alone, no collective. The count is a 0-dim tensor (no
    host-device sync); when the whole group's batch is empty, mean and variance are 0.
    """
    return _combine(_gather_rows(_local_row(x), group))


def _memory_format(x):
    """``x``'s memory format if channels-last (2D or 3D), else contiguous."""
    for fmt in (torch.channels_last, torch.channels_last_3d):
        if x.dim() == (4 if fmt is torch.channels_last else 5) and x.is_contiguous(
                memory_format=fmt):
            return fmt
    return torch.contiguous_format


class _GlobalBatchNorm(torch.autograd.Function):
    """``y = (x - mean) * invstd * w + b`` with given global statistics; the backward
    gives BN's input gradient on the group's concatenated batch (one all_gather) and this
    rank's own contribution to the weight and bias gradients.

    BN's cost: the output is one pass (on CPU the compiled kernel, ``(x - mean)`` first;
    elsewhere BN's eval kernel); the backward is one fused reduction pass (``sum(dy)``,
    ``sum(dy * xhat)``, BN's backward kernel), then
    ``dx = A * dy + B * (x - mean) + C`` per channel (one pass: on CPU the compiled
    kernel, on CUDA torch's SyncBN kernel; two passes elsewhere and under torch.compile),
    without ``xhat`` or any other full-size temporary. Saves only ``x``
    (and per-channel vectors). ``layer``: the calling PortableSyncBN in eager mode (it
    bounds the backward's wait), None under torch.compile."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, invstd, count, group, eps, layer):
        sd = mean.dtype
        if _fused_grad_input(x):  # that kernel reads x and dy in one memory format
            x = x.contiguous(memory_format=_memory_format(x))
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group, ctx.layer = group, layer
        if x.numel() == 0:  # BN's kernels refuse empty input; this rank still takes part
            return torch.empty_like(x)
        if _kernels_apply(x):
            return cpu_kernels.normalize(x, mean, invstd, weight, bias)
        return torch.batch_norm(x, cast(weight, sd), cast(bias, sd), mean, var, False, 0.0,
                                eps, torch.backends.cudnn.enabled)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd, count = ctx.saved_tensors
        sd = mean.dtype
        # this rank's sum(dy * xhat) and sum(dy), in one pass
        if x.numel() == 0:
            sum_dy_xhat = sum_dy = torch.zeros_like(mean)
        else:
            _, sum_dy_xhat, sum_dy = _bn_backward(dy, x, None, None, None, mean, invstd,
                                                  True, 0.0, [False, True, True])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # summed over the group: every rank's row in one all_gather, added up here in
            # rank order (one exchange: on gloo half the latency of an all_reduce's two)
            sums = _gather_rows(torch.cat([sum_dy, sum_dy_xhat]).to(sd)[None], ctx.group,
                                'gradient statistics', ctx.layer).sum(0)
            if x.numel() == 0:
                grad_x = torch.empty_like(x)
            elif _fused_grad_input(x):
                # the group's sum(dy) and sum(dy * (x - mean)); counts as int32, summed
                group_dy, group_dy_xhat = sums.chunk(2)
                grad_x = torch.batch_norm_backward_elemt(
                    dy.contiguous(memory_format=_memory_format(x)), x, mean, invstd,
                    cast(weight, sd), group_dy, group_dy_xhat / invstd,
                    count.to(torch.int32).view(1))
            elif _kernels_apply(x):
                grad_x = cpu_kernels.grad_input(dy, x, mean, invstd, weight, sums, count)
            else:
                mean_dy, mean_dy_xhat = (sums / count.clamp_min(1)).chunk(2)
                # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
                #    = a * dy + b * (x - mean) + c
                a = invstd if weight is None else invstd * cast(weight, sd)
                b, c = -a * invstd * mean_dy_xhat, -a * mean_dy
                grad_x = torch.batch_norm(x, b, c, mean, torch.ones_like(mean), False,
                                          0.0, 0.0, torch.backends.cudnn.enabled)
                grad_x.addcmul_(dy, channel_view(cast(a, grad_x.dtype), x.dim()))
        if ctx.needs_input_grad[1]:
            grad_w = cast(sum_dy_xhat, weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = cast(sum_dy, weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


@MODELS.register_module()
class PortableSyncBN(_BatchNorm):
    """Synchronised BN for ``(N, C, *)`` input on any device and backend.

    Args are those of ``nn.BatchNorm2d`` plus

    - ``group_size`` (int or None): synchronise within consecutive blocks of
      ``group_size`` ranks (None: all ranks). It must divide the world size; 1 gives local
      BN on every rank.
    - ``sync_timeout`` (seconds > 0, or None): how long a training-mode call on the CPU
      waits for the rest of its group before it raises (the process group's timeout if
      that is shorter; None: only the process group's). The default, 600 s (nccl's default
      process-group timeout), outlasts a slow first iteration, a data loading stall or
      rank 0 saving a checkpoint. Under torch.compile, and on CUDA, the process group's
      timeout applies.

    Before its first synchronised gather (and again for another statistics dtype), the
    layer checks in one all_gather of 4 numbers that every rank of the group has its
    channel count and statistics dtype (eager mode; skipped under torch.compile).

    Gradients follow torch's ``SyncBatchNorm``: the input gradient is this rank's slice of
    BN's input gradient on the group's concatenated batch; the weight/bias gradients are
    this rank's own contribution (summed over the group they equal BN's), so DDP averages
    them like any other parameter. A zero-size batch on one rank still takes part in the
    collectives (and its running statistics follow the group's); only when the whole
    group's batch is empty is the output empty with no state change.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, group_size=None, sync_timeout=600.0, device=None,
                 dtype=None):
        check_bn_args('PortableSyncBN', num_features, eps, momentum, affine,
                      track_running_stats)
        if group_size is not None and (isinstance(group_size, bool)
                                       or not isinstance(group_size, int) or group_size < 1):
            raise ValueError('PortableSyncBN: group_size must be None (all ranks) or a '
                             f'positive int dividing the world size, got {group_size!r}')
        if sync_timeout is not None:
            check_real('PortableSyncBN', 'sync_timeout', sync_timeout, lambda v: v > 0,
                       'None or a finite number of seconds > 0')
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.group_size = group_size
        self.sync_timeout = sync_timeout
        self._ordinal = None  # number among the process's layers, at the first handshake
        self._agreed = set()  # statistics dtypes (bits) the group has agreed on

    def _check_input_dim(self, x):
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f'{type(self).__name__}: expected input of shape '
                             f'(N, {self.num_features}, *), got {tuple(x.shape)}')

    def extra_repr(self):
        return (f'{super().extra_repr()}, group_size={self.group_size}, '
                f'sync_timeout={self.sync_timeout}')

    def _sync_name(self):
        """The layer in errors: ``PortableSyncBN #3 (64 channels)``, #3 being its place
        among this process's PortableSyncBN layers in the order they first synchronised
        (the same on every rank that runs the same model)."""
        return f'PortableSyncBN #{self._ordinal} ({self.num_features} channels)'

    def _handshake(self, x, group):
        """Once per statistics dtype: check that every rank of ``group`` has this layer's
        channel count and statistics dtype (one all_gather of a float64 ``(1, 4)`` row,
        see ``_HANDSHAKE_MARK``); a mismatch is an error on every rank. The agreement is
        kept on the module (not in the state dict)."""
        bits = stat_dtype(x.dtype).itemsize * 8
        if bits in self._agreed:
            return
        if self._ordinal is None:
            self._ordinal = next(_ORDINALS)
        row = torch.tensor([[_HANDSHAKE_MARK, self._ordinal, self.num_features, bits]],
                           dtype=torch.float64, device=x.device)
        rows = _gather_rows(row, group, 'the handshake (channel count, dtype)', self)
        _check_agreement(self, rows.tolist(), group)
        self._agreed.add(bits)

    def _sync_group(self):
        """Process group to synchronise with in this call, or None for plain BN."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        return _process_group(self.group_size)

    def _empty_output(self, x):
        """Empty output that still reaches weight and bias (zero gradients, for DDP)."""
        if not self.affine:
            return x.clone()
        return cast(x * channel_view(self.weight, x.dim()) + channel_view(self.bias, x.dim()),
                    x.dtype)

    def _updates_statistics(self) -> bool:
        """Whether this call advances the running statistics: a training-mode call,
        unless activation checkpointing is re-running it inside the backward pass."""
        return self.training and self.track_running_stats and not inside_backward()

    def _momentum_now(self) -> float:
        """This step's weight of the new value (``momentum=None``: cumulative average)."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(self.num_batches_tracked) + 1.0)

    @torch.no_grad()
    def _commit(self, mean, var, valid=None):
        """Store a step's updated running statistics, unless they are not finite (an
        inf or NaN in the batch, e.g. an fp16 overflow that GradScaler will skip) or
        ``valid`` (a bool tensor) is false: then nothing changes, counter included. A
        masked update, no host-device sync."""
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        if valid is not None:
            finite = finite & valid
        self.running_mean.copy_(torch.where(finite, mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, var, self.running_var))
        self.num_batches_tracked.add_(finite.to(self.num_batches_tracked.dtype))

    @torch.no_grad()
    def _update_running_stats(self, mean, var, count):
        momentum = self._momentum_now()
        unbiased = var * (count / (count - 1).clamp_min(1))
        self._commit(self.running_mean.lerp(mean.to(self.running_mean.dtype), momentum),
                     self.running_var.lerp(unbiased.to(self.running_var.dtype), momentum),
                     valid=count > 1)  # an empty group's batch, or one value, moves nothing

    def _local_forward(self, x):
        """Plain BN on this rank's batch by BN's own kernel, which updates copies of the
        running statistics; they are stored through :meth:`_commit` (so a non-finite
        batch leaves the layer's as they were), and not at all in a recomputation (the
        same kernel runs, so activation checkpointing sees the same saved tensors)."""
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(x, mean, var, self.weight, self.bias, True, self._momentum_now(),
                         self.eps)
        if not inside_backward():
            self._commit(mean, var)
        return y

    def forward(self, x):
        self._check_input_dim(x)
        group = self._sync_group()
        if group is None:
            if x.numel() == 0:
                return self._empty_output(x)
            return self._local_forward(x)
        layer = None if torch.compiler.is_compiling() else self  # bounds waits, names errors
        if layer is not None:
            self._handshake(x, group)
        gathered = _gather_rows(_local_row(x), group, 'batch statistics', layer)
        total = None
        if _kernels_apply(x):  # statistics and the running update in one call
            running = ((self.running_mean, self.running_var, self.num_batches_tracked)
                       if self._updates_statistics() else (None, ) * 3)
            mean, var, invstd, count, total = cpu_kernels.combine(gathered, self.eps, *running,
                                                                  self.momentum)
        else:
            mean, var, count = _combine(gathered)
            # reading the count is free on the CPU; a compiled graph never reads it (an
            # empty group batch then gives an empty output and no state change too)
            if x.device.type == 'cpu' and not torch.compiler.is_compiling():
                total = int(count)
            if self._updates_statistics():  # no-op for a group batch of 0 or 1 values
                self._update_running_stats(mean, var, count)
            invstd = torch.rsqrt(var + self.eps)
        if total == 0:
            return self._empty_output(x)
        if total == 1:
            raise ValueError('PortableSyncBN: expected more than 1 value per channel over '
                             f'the group in training, got input of shape {tuple(x.shape)} '
                             'on this rank and 1 value in total')
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, mean, var, invstd, count,
                                      group, self.eps, layer)

"""MABN's training step as ``torch.library`` ops in the ``mmdet_bnplug`` namespace.

``mabn_train`` is the whole step; torch attaches autograd formulas only to functional
ops, so it is a composite (CompositeImplicitAutograd) of three ops, each declaring
exactly what it mutates::

    mabn_train(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_var,
               Tensor(b!) num_batches_tracked, Tensor(c!) buffer_x2, Tensor buffer_gz,
               float eps, float momentum, float r_max, int warmup_iters,
               int renorm_iters) -> (Tensor y, Tensor coeffs, Tensor step)
    mabn_train_stats(Tensor x, Tensor(a!) running_var, Tensor(b!) num_batches_tracked,
                     Tensor(c!) buffer_x2, float eps, float momentum, float r_max,
                     int warmup_iters, int renorm_iters) -> (Tensor coeffs, Tensor step)
    mabn_train_affine(Tensor x, Tensor? weight, Tensor? bias, Tensor coeffs, Tensor step,
                      Tensor buffer_gz, int warmup_iters) -> Tensor
    mabn_train_backward(Tensor dy, Tensor x, Tensor? weight, Tensor coeffs, Tensor step,
                        Tensor(a!) buffer_gz, int warmup_iters, bool[3] output_mask)
                        -> (Tensor dx, Tensor dw, Tensor db)

- ``mabn_train_stats``: the spec's "Training forward" statistics (one reduction pass over
  ``x``, no gradient): advances the counter to t, writes ``buffer_x2[t % B]`` and
  ``running_var``; returns ``coeffs`` (2, C) in the statistics dtype, rows
  ``q = r / sqrt(s2 + eps)`` and ``-1 / (s2 + eps)``, and ``step``, t.
- ``mabn_train_affine``: ``y = (q * w) * x + b`` (one pass), differentiable; its autograd
  rule is ``mabn_train_backward``. ``buffer_gz`` and ``warmup_iters`` are read only by
  the backward.
- ``mabn_train_backward``: the spec's "Training backward" (one fused reduction pass, then
  ``dx = a * dy + k * x``): writes ``buffer_gz[t % B]``; ``dw``, ``db`` in the statistics
  dtype; outputs ``output_mask`` (dx, -, db) does not ask for are empty (0,) tensors.
- Non-finite guard (AMP overflow; not in the spec): a forward whose ``x2`` has a
  non-finite channel writes no state (counter, ``buffer_x2``, ``running_var`` keep their
  values; ``step`` is still t, so the next step reuses t); a backward whose ``gz`` has
  a non-finite channel does not write ``buffer_gz``. That step's own output may be
  non-finite (GradScaler skips it); later steps are as if the write never happened.

``mabn_train`` = ``mabn_train_stats`` on the detached ``x``, then ``mabn_train_affine``
(buffer_gz is written by its backward); ``coeffs`` and ``step`` let a caller recompute
``y`` by ``mabn_train_affine`` without a second state change (activation
checkpointing). The three ops have fake implementations (``mabn_train`` decomposes into
them), so torch.compile and torch.export see opaque, well-described ops. Implementations:
on CPU the C++ kernels of ``csrc/mabn_cpu.cpp`` (``cpu_kernels``, registered for the CPU
key, and the autograd rule as a C++ node for AutogradCPU) when built; otherwise, and on
every other device, the PyTorch implementation below (CompositeExplicitAutograd) with the
autograd rule registered by ``register_autograd``. The PyTorch implementation makes no
host-device sync: the phase is chosen by tensor ops on the counter, never read on the host.
"""
import contextlib
import functools
import warnings

import torch

from ..utils.tensors import cast, channel_view, stat_dtype

NAMESPACE = 'mmdet_bnplug'
SCHEMAS = {
    'mabn_train':
    '(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_var, '
    'Tensor(b!) num_batches_tracked, Tensor(c!) buffer_x2, Tensor buffer_gz, float eps, '
    'float momentum, float r_max, int warmup_iters, int renorm_iters) '
    '-> (Tensor y, Tensor coeffs, Tensor step)',
    'mabn_train_stats':
    '(Tensor x, Tensor(a!) running_var, Tensor(b!) num_batches_tracked, '
    'Tensor(c!) buffer_x2, float eps, float momentum, float r_max, int warmup_iters, '
    'int renorm_iters) -> (Tensor coeffs, Tensor step)',
    'mabn_train_affine':
    '(Tensor x, Tensor? weight, Tensor? bias, Tensor coeffs, Tensor step, '
    'Tensor buffer_gz, int warmup_iters) -> Tensor',
    'mabn_train_backward':
    '(Tensor dy, Tensor x, Tensor? weight, Tensor coeffs, Tensor step, '
    'Tensor(a!) buffer_gz, int warmup_iters, bool[3] output_mask) '
    '-> (Tensor dx, Tensor dw, Tensor db)',
}
_lib = torch.library.Library(NAMESPACE, 'FRAGMENT')
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)

_bn_backward = torch.ops.aten.native_batch_norm_backward


@functools.lru_cache(maxsize=None)
def _warn_not_compiled() -> None:
    """Warn once that the compiled CPU kernels are missing (see setup.py)."""
    warnings.warn("MABN: the compiled CPU step (mmdet_bnplug.ops._mabn_cpu) is not "
                  "built, training on CPU uses the PyTorch step: same results, slower on "
                  "small feature maps. Reinstall with a C++ compiler: pip install "
                  "--no-build-isolation -e <mmdet-bnplug checkout>")


# ---- the PyTorch implementation (any device) ----


def _dot_sums(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, sum_a: bool):
    """``(weight * sum(a * b), sum(a) or None)`` per channel of two ``(N, C, *)``
    tensors, in one fused pass without temporaries: BN's backward reduction, whose
    weight gradient is ``sum(dy * (x - mean)) * invstd`` and bias gradient
    ``sum(dy)``, with mean 0 and invstd ``weight``. Accumulates in fp32 for half
    inputs; any memory format."""
    _, s_ab, s_a = _bn_backward(a, b, None, None, None, torch.zeros_like(weight), weight,
                                True, 0.0, [False, True, sum_a])
    return s_ab, s_a


def _affine(x: torch.Tensor, scale: torch.Tensor, shift) -> torch.Tensor:
    """``scale[c] * x + shift[c]`` by BN's eval kernel (mean 0, variance 1, eps 0):
    fp32 coefficients with half ``x`` (small scales do not underflow), output in
    ``x``'s dtype and memory format, one pass."""
    return torch.batch_norm(x, scale, shift, torch.zeros_like(scale), torch.ones_like(scale),
                            False, 0.0, 0.0, torch.backends.cudnn.enabled)


def _record(buffer: torch.Tensor, step: torch.Tensor, value: torch.Tensor,
            warmup_iters: int, finite: torch.Tensor) -> torch.Tensor:
    """``buffer[t % B] = value`` if ``finite`` (a bool tensor; else the row keeps its
    value); returns ``value`` in the batch-statistics phase (``t <= B or t <
    warmup_iters``), else the mean of the B rows. Tensor ops only (no host sync)."""
    rows = buffer.shape[0]
    index = torch.remainder(step, rows).view(1)
    row = torch.where(finite, cast(value, buffer.dtype), buffer.index_select(0, index)[0])
    buffer.index_copy_(0, index, row.unsqueeze(0))
    use_batch = (step <= rows) | (step < warmup_iters)
    return torch.where(use_batch, value, buffer.mean(0, dtype=value.dtype))


def _scale(q: torch.Tensor, weight) -> torch.Tensor:
    """``q * w`` per channel (``q`` without affine)."""
    return q if weight is None else q * cast(weight, q.dtype)


def train_stats_pytorch(x, running_var, num_batches_tracked, buffer_x2, eps, momentum,
                        r_max, warmup_iters, renorm_iters):
    """``mabn_train_stats`` in PyTorch (see the module docstring)."""
    if x.device.type == 'cpu' and cpu_kernels is None:
        _warn_not_compiled()
    ones = torch.ones(x.shape[1], dtype=stat_dtype(x.dtype), device=x.device)
    x2 = _dot_sums(x, x, ones, False)[0].div_(x.numel() // x.shape[1])
    finite = torch.isfinite(x2).all()
    step = num_batches_tracked + 1
    num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    s2 = _record(buffer_x2, step, x2, warmup_iters, finite)
    var = s2 + eps
    inv_std = var.rsqrt()
    # r = clip(sqrt(s2 + eps) / sqrt(running_var + eps)), running_var before this
    # step's update, once t > max(renorm_iters, warmup_iters); else 1
    r = var.div_(cast(running_var, var.dtype) + eps).sqrt_().clamp_(1 / r_max, r_max)
    q = torch.where(step > max(renorm_iters, warmup_iters), r.mul_(inv_std), inv_std)
    running_var.copy_(torch.where(finite, running_var.lerp(cast(s2, running_var.dtype),
                                                           momentum), running_var))
    return torch.stack([q, inv_std.square_().neg_()]), step


def train_affine_pytorch(x, weight, bias, coeffs, step, buffer_gz, warmup_iters):
    """``mabn_train_affine`` in PyTorch."""
    return _affine(x, _scale(coeffs[0], weight), cast(bias, coeffs.dtype))


def train_backward_pytorch(dy, x, weight, coeffs, step, buffer_gz, warmup_iters,
                           output_mask):
    """``mabn_train_backward`` in PyTorch: dw = q * sum(dy * x), db = sum(dy),
    gz = w * dw / n, dx = (q * w) * dy - mgz / (s2 + eps) * x."""
    q, neg_inv_var = coeffs[0], coeffs[1]
    dw, db = _dot_sums(dy, x, q, output_mask[2])
    gz = dw * (1.0 / (x.numel() // x.shape[1]))
    if weight is not None:
        gz.mul_(cast(weight, gz.dtype))
    mgz = _record(buffer_gz, step, gz, warmup_iters, torch.isfinite(gz).all())
    dx = x.new_empty(0)
    if output_mask[0]:
        dx = _affine(x, mgz.mul_(neg_inv_var), None)
        dx.addcmul_(dy, channel_view(cast(_scale(q, weight), dx.dtype), x.dim()))
    return dx, dw, db if output_mask[2] else dw.new_empty(0)


PYTORCH_IMPLS = {'mabn_train_stats': train_stats_pytorch,
                 'mabn_train_affine': train_affine_pytorch,
                 'mabn_train_backward': train_backward_pytorch}
for _name, _impl in PYTORCH_IMPLS.items():  # every device; CPU too without the build
    _lib.impl(_name, _impl, 'CompositeExplicitAutograd')

# ---- fake implementations: shapes, dtypes, devices of the outputs ----


@torch.library.register_fake(f'{NAMESPACE}::mabn_train_stats', lib=_lib)
def _train_stats_fake(x, running_var, num_batches_tracked, buffer_x2, *hyper):
    coeffs = x.new_empty((2, x.shape[1]), dtype=stat_dtype(x.dtype))
    return coeffs, torch.empty_like(num_batches_tracked)


@torch.library.register_fake(f'{NAMESPACE}::mabn_train_affine', lib=_lib)
def _train_affine_fake(x, weight, bias, coeffs, step, buffer_gz, warmup_iters):
    return torch.empty_like(x)


@torch.library.register_fake(f'{NAMESPACE}::mabn_train_backward', lib=_lib)
def _train_backward_fake(dy, x, weight, coeffs, step, buffer_gz, warmup_iters, output_mask):
    dx = torch.empty_like(x) if output_mask[0] else x.new_empty(0)
    dw = coeffs.new_empty(x.shape[1])
    return dx, dw, dw.new_empty(x.shape[1] if output_mask[2] else 0)


# ---- autograd: mabn_train_affine's backward is mabn_train_backward ----


def _affine_setup_context(ctx, inputs, output):
    x, weight, bias, coeffs, step, buffer_gz, warmup_iters = inputs
    ctx.save_for_backward(x, weight, coeffs, step)
    # the ring buffer is written by the backward, not read as a saved value: kept out
    # of save_for_backward's version check (a layer may run twice per iteration)
    ctx.buffer_gz, ctx.warmup_iters, ctx.has_bias = buffer_gz, warmup_iters, bias is not None


def _affine_backward(ctx, dy, *_):
    x, weight, coeffs, step = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = torch.ops.mmdet_bnplug.mabn_train_backward.default(
        dy, x, weight, coeffs, step, ctx.buffer_gz, ctx.warmup_iters,
        [need_x, need_w, need_b and ctx.has_bias])
    if weight is None:
        return dx if need_x else None, None, None, None, None, None, None
    return (dx if need_x else None, cast(dw, weight.dtype) if need_w else None,
            cast(db, weight.dtype) if need_b else None, None, None, None, None)


torch.library.register_autograd(f'{NAMESPACE}::mabn_train_affine', _affine_backward,
                                setup_context=_affine_setup_context, lib=_lib)

try:  # importing registers the C++ kernels for CPU and AutogradCPU (setup.py builds it)
    from . import _mabn_cpu as cpu_kernels
except ImportError:
    cpu_kernels = None
if cpu_kernels is not None and set(getattr(cpu_kernels, 'REGISTERED', ())) != set(SCHEMAS):
    warnings.warn('MABN: mmdet_bnplug.ops._mabn_cpu is a stale build that registers none '
                  'of the ops; rebuild it: pip install --no-build-isolation -e <checkout>')
    cpu_kernels = None


@contextlib.contextmanager
def pytorch_on_cpu():
    """The ops' PyTorch implementation on CPU too while inside (tests): its functions
    replace the C++ kernels for the CPU key (autograd stays the C++ node on CPU); the
    kernels are back on exit."""
    override = torch.library.Library(NAMESPACE, 'IMPL')
    try:
        with warnings.catch_warnings():  # "Overriding a previously registered kernel"
            warnings.simplefilter('ignore', UserWarning)
            for name, impl in PYTORCH_IMPLS.items():
                override.impl(name, impl, 'CPU')
        yield
    finally:
        override._destroy()


train_stats = torch.ops.mmdet_bnplug.mabn_train_stats.default
train_affine = torch.ops.mmdet_bnplug.mabn_train_affine.default
train_backward = torch.ops.mmdet_bnplug.mabn_train_backward.default


def _train_composite(x, weight, bias, running_var, num_batches_tracked, buffer_x2, buffer_gz,
                     eps, momentum, r_max, warmup_iters, renorm_iters):
    """``mabn_train``: ``mabn_train_stats`` on ``x`` (detached: the statistics carry no
    gradient), then ``mabn_train_affine``; ``(y, coeffs, step)``. The C++ extension
    registers the same composite (``train`` in mabn_cpu.cpp)."""
    coeffs, step = train_stats(x.detach(), running_var, num_batches_tracked, buffer_x2, eps,
                               momentum, r_max, warmup_iters, renorm_iters)
    return train_affine(x, weight, bias, coeffs, step, buffer_gz, warmup_iters), coeffs, step


if cpu_kernels is None:
    _lib.impl('mabn_train', _train_composite, 'CompositeImplicitAutograd')
train = torch.ops.mmdet_bnplug.mabn_train.default

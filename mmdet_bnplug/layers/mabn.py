"""MABN: moving-average batch normalisation (Yan et al., ICLR 2020).

Normalises by the second moment E[x^2] (no mean-centring; pair it with ``ConvWC``),
replaces batch statistics in the forward *and* backward pass by simple moving averages
over the last ``buffer_size`` iterations, and renormalises towards ``running_var`` like
Batch Renormalisation. In eval mode it is BN's per-channel affine map with a zero mean.
Training on CPU runs the compiled step of ``csrc/mabn_cpu.cpp`` when it is built; every
other device, or a missing build, runs ``_MABNFunction`` (same arithmetic). User guide:
``docs/mabn.md``; the algorithm line by line: ``SpecMABN`` in ``tests/test_mabn.py``.
"""
import functools
import warnings
from typing import NamedTuple

import torch
from mmengine.registry import MODELS
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from ._checks import check_bool, check_int, check_real

_bn_backward = torch.ops.aten.native_batch_norm_backward

try:  # the compiled CPU training step, built at install time (setup.py)
    from ..ops import _mabn_cpu
except ImportError:
    _mabn_cpu = None


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of per-channel statistics: fp32 for half/bf16 input, else the input's."""
    return torch.promote_types(dtype, torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, cheaper when nothing changes (the common case)."""
    return t if t.dtype == dtype else t.to(dtype)


class _Consts(NamedTuple):
    """Cached constants in the statistics dtype: ``zeros``, ``ones`` (C,) feed BN
    kernels an identity mean/variance; ``eps`` 0-dim (cheaper to add than a float)."""
    zeros: torch.Tensor
    ones: torch.Tensor
    eps: torch.Tensor


def _affine(x: torch.Tensor, scale: torch.Tensor, shift, consts: _Consts):
    """``scale[c] * x + shift[c]`` by BN's eval kernel (mean 0, variance 1, eps 0):
    fp32 coefficients with half ``x`` (small scales do not underflow), output in
    ``x``'s dtype and memory format, one pass."""
    return torch.batch_norm(x, scale, shift, consts.zeros, consts.ones, False, 0.0, 0.0,
                            torch.backends.cudnn.enabled)


def _dot_sums(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, consts: _Consts,
              sum_a: bool):
    """``(weight * sum(a * b), sum(a) or None)`` per channel of two ``(N, C, *)``
    tensors, in one fused pass without temporaries: BN's backward reduction, whose
    weight gradient is ``sum(dy * (x - mean)) * invstd`` and bias gradient
    ``sum(dy)``, with mean 0 and invstd ``weight``. Accumulates in fp32 for half
    inputs; any memory format."""
    _, s_ab, s_a = _bn_backward(a, b, None, None, None, consts.zeros, weight, True, 0.0,
                                [False, True, sum_a])
    return s_ab, s_a


def _ring_mean(buffer: torch.Tensor, consts: _Consts) -> torch.Tensor:
    """Mean of the ring buffer's B rows, (C,) in the statistics dtype (no matmul:
    autocast would run it in half precision)."""
    return buffer.mean(0, dtype=consts.zeros.dtype)


@functools.lru_cache(maxsize=None)
def _warn_not_compiled() -> None:
    """Warn once that the compiled CPU step is missing (see setup.py)."""
    warnings.warn("MABN: the compiled CPU step (mmdet_bnplug.ops._mabn_cpu) is not "
                  "built, training on CPU uses the PyTorch step: same results, slower on "
                  "small feature maps. Reinstall with a C++ compiler: pip install "
                  "--no-build-isolation -e <mmdet-bnplug checkout>")


def _inside_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread, which is
    where activation checkpointing (reentrant or not) re-runs forwards."""
    task_id = getattr(torch._C, '_current_graph_task_id', None)
    return task_id is not None and task_id() != -1


class _Step(NamedTuple):
    """Constants of one training step, (C,) tensors in the statistics dtype."""
    q: torch.Tensor  # r / sqrt(s2 + eps)
    neg_inv_var: torch.Tensor  # -1 / (s2 + eps)
    slot: int  # ring-buffer row t % buffer_size
    use_batch: bool  # batch statistics instead of the moving averages


class _MABNFunction(torch.autograd.Function):
    """MABN's training step: ``layer._step`` advances the statistics, the output is
    ``y = (q * w)[c] * x + b[c]``, the backward is the spec's ("Training backward")
    and writes ``buffer_gz[slot]``.

    Cost as BN's: the forward is one reduction pass (``sum(x^2)``) and one affine
    pass; the backward one fused reduction pass (``sum(dy)``, ``sum(dy * x)``) and
    ``dx = a * dy + k * x`` with per-channel ``a = q * w``, ``k = -mgz / (s2 + eps)``
    (two passes, no temporaries). Saves only ``x``; no host-device sync.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, consts: _Consts):
        step = layer._step(x, consts)
        scale = step.q if weight is None else step.q * _cast(weight, step.q.dtype)
        shift = None if bias is None else _cast(bias, step.q.dtype)
        ctx.save_for_backward(x, weight)
        ctx.scale, ctx.step, ctx.buffer_gz, ctx.consts = (scale, step, layer.buffer_gz,
                                                          consts)
        return _affine(x, scale, shift, consts)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        step, buffer_gz, consts = ctx.step, ctx.buffer_gz, ctx.consts
        # dw = sum(dy * r * z) = q * sum(dy * x); db = sum(dy)
        dw, db = _dot_sums(dy, x, step.q, consts, ctx.needs_input_grad[2])
        # gz = mean(g * z) with g = dy * w * r, z = x / sqrt(s2 + eps): w * dw / n
        inv_n = 1.0 / (x.numel() // x.shape[1])
        gz = dw * inv_n if weight is None else torch.addcmul(
            consts.zeros, dw, _cast(weight, dw.dtype), value=inv_n)
        buffer_gz[step.slot] = gz
        dx = None
        if ctx.needs_input_grad[0]:
            # dx = (g - z * mgz) / sqrt(s2 + eps) = (q * w) * dy - mgz / (s2 + eps) * x
            mgz = gz if step.use_batch else _ring_mean(buffer_gz, consts)
            dx = _affine(x, mgz.mul_(step.neg_inv_var), None, consts)
            dx.addcmul_(dy, _cast(ctx.scale, dx.dtype).view((-1, ) + (1, ) * (x.dim() - 2)))
        if weight is not None:
            dw = _cast(dw, weight.dtype)
            db = None if db is None else _cast(db, weight.dtype)
        return dx, dw, db, None, None


@MODELS.register_module()
class MABN(_BatchNorm):
    """Moving-average batch normalisation for inputs ``(N, C, *)``.

    Args:
        num_features (int): C.
        eps (float): added to the second moment, > 0. Default 1e-5.
        momentum (float): PyTorch's sense, the weight of the *new* value in
            ``running_var = (1 - momentum) * running_var + momentum * s2``, in (0, 0.5]
            or 1 (values in (0.5, 1) are refused: they look like the paper's decay).
            Default 0.02, i.e. the paper's decay of 0.98.
        affine (bool): learn a per-channel weight and bias. Default True.
        buffer_size (int): B, iterations averaged by the SMA (paper: simulated batch
            / per-device batch, 32 // 2 = 16 for detection). Default 16.
        warmup_iters (int): batch statistics are used while ``t < warmup_iters``
            (and while ``t <= buffer_size``). Default 100.
        renorm_iters (int): the renorm factor is 1 while
            ``t <= max(renorm_iters, warmup_iters)``. Default 1000.
        r_max (float): afterwards the renorm factor is clipped to [1/r_max, r_max],
            >= 1. Default 5.

    State (all in the state dict): ``running_var`` (C,) holds E[x^2], not a centred
    variance; ``running_mean`` (C,) stays zero so that BN tools read the eval map
    correctly; ``num_batches_tracked`` is the iteration counter t; ``buffer_x2`` and
    ``buffer_gz`` (B, C) are the ring buffers of forward and backward statistics.
    Loading a plain BN state dict maps it eval-exactly (see ``from_batchnorm``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.02,
                 affine: bool = True, buffer_size: int = 16, warmup_iters: int = 100,
                 renorm_iters: int = 1000, r_max: float = 5.0, device=None,
                 dtype=None):
        check_int('MABN', 'num_features', num_features, 1)
        check_real('MABN', 'eps', eps, lambda v: v > 0, 'a finite number > 0')
        check_real('MABN', 'momentum', momentum, lambda v: 0 < v <= 1,
                   'a number in (0, 1] (PyTorch sense: weight of the new value)')
        if 0.5 < momentum < 1:
            raise ValueError(
                f'MABN: momentum={momentum!r} is the weight of the *new* value (PyTorch '
                f'sense); the paper\'s decay of {momentum} is momentum={1 - momentum:.4g}. '
                'Accepted: (0, 0.5] or 1')
        check_bool('MABN', 'affine', affine)
        check_int('MABN', 'buffer_size', buffer_size, 1)
        check_int('MABN', 'warmup_iters', warmup_iters, 0)
        check_int('MABN', 'renorm_iters', renorm_iters, 0)
        check_real('MABN', 'r_max', r_max, lambda v: v >= 1, 'a finite number >= 1')
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        self.renorm_iters = renorm_iters
        self.r_max = float(r_max)
        factory = dict(device=self.running_var.device, dtype=self.running_var.dtype)
        self.register_buffer('buffer_x2', torch.zeros(buffer_size, num_features, **factory))
        self.register_buffer('buffer_gz', torch.zeros(buffer_size, num_features, **factory))
        # host-side state, mutated in place (cheaper than Module.__setattr__):
        # 'step': the PyTorch path's last training step, reused when activation
        # checkpointing re-runs the forward inside the backward pass; 'counter': see
        # _tick; 'compiled': the compiled path's State (its last step, constants)
        self._host = dict(step=None, counter=None, compiled=None)
        self._const_cache = {}

    def extra_repr(self) -> str:
        return (f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, '
                f'affine={self.affine}, buffer_size={self.buffer_size}, '
                f'warmup_iters={self.warmup_iters}, renorm_iters={self.renorm_iters}, '
                f'r_max={self.r_max}')

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if hasattr(self, 'buffer_x2'):  # _BatchNorm.__init__ calls this before they exist
            self.buffer_x2.zero_()
            self.buffer_gz.zero_()
            self._host.update(step=None, compiled=None)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f'MABN expects input of shape (N, C, *) with rank >= 2, '
                             f'got shape {tuple(x.shape)}')
        if x.shape[1] != self.num_features:
            raise ValueError(f'MABN({self.num_features}) expects {self.num_features} '
                             f'channels (num_features) at dim 1, got shape '
                             f'{tuple(x.shape)}')
        if not x.is_floating_point():
            raise TypeError(f'MABN({self.num_features}) expects a floating-point input, '
                            f'got {x.dtype}')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or x.numel() == 0:
            # eval map; an empty batch leaves every buffer untouched
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean,
                                    self.running_var, False, 0.0, self.eps,
                                    torch.backends.cudnn.enabled)
        if x.device.type == 'cpu' and self.running_var.dtype == _stat_dtype(x.dtype):
            if _mabn_cpu is not None:
                return self._compiled_cpu_step(x)
            _warn_not_compiled()
        return self._pytorch_step(x)

    def _pytorch_step(self, x: torch.Tensor) -> torch.Tensor:
        """The training step by ``_MABNFunction``: any device, any dtype."""
        return _MABNFunction.apply(x, self.weight, self.bias, self, self._consts(x))

    def _compiled_cpu_step(self, x: torch.Tensor) -> torch.Tensor:
        """The training step by ``_mabn_cpu.train_step`` (mabn_cpu.cpp): the same
        arithmetic as ``_MABNFunction``, counter and phase included, in one call with
        a C++ autograd node. The counter is read on the host: free on CPU."""
        state = self._host['compiled']
        if state is None:
            state = self._host['compiled'] = _mabn_cpu.State()
        return _mabn_cpu.train_step(x, self.weight, self.bias, self.running_var,
                                    self.num_batches_tracked, self.buffer_x2, self.buffer_gz,
                                    state, self.eps, self.momentum, self.r_max,
                                    self.warmup_iters, self.renorm_iters)

    def _consts(self, x: torch.Tensor) -> _Consts:
        key = (x.dtype, x.device, self.eps)
        consts = self._const_cache.get(key)
        if consts is None:
            with torch.inference_mode(False):
                zeros = torch.zeros(self.num_features, dtype=_stat_dtype(x.dtype),
                                    device=x.device)
                consts = self._const_cache[key] = _Consts(
                    zeros, torch.ones_like(zeros),
                    torch.tensor(self.eps, dtype=zeros.dtype, device=x.device))
        return consts

    def _step(self, x: torch.Tensor, consts: _Consts) -> _Step:
        """This training step's constants; the statistics advance unless activation
        checkpointing re-runs the forward (inside the backward): then the step being
        recomputed is returned again and no state changes."""
        host = self._host
        if host['step'] is None or not _inside_backward():
            host['step'] = self._advance(x, consts)
        return host['step']

    def _tick(self) -> int:
        """Advance ``num_batches_tracked`` and return it as a Python int, without a
        host-device sync: a host copy is kept and re-read (one sync) only when other
        code has written or replaced the buffer (load_state_dict, ``.to()``, ...)."""
        t = self.num_batches_tracked
        seen = self._host['counter']  # (the buffer, its version, its value)
        if seen is None or seen[0] is not t or seen[1] != t._version:
            seen = (t, t._version, int(t))
        t.add_(1)
        self._host['counter'] = (t, t._version, seen[2] + 1)
        return seen[2] + 1

    def _advance(self, x: torch.Tensor, consts: _Consts) -> _Step:
        """The spec's "Training forward" statistics: advance t, record E[x^2], update
        ``running_var``; return the constants the output and backward need."""
        x2 = _dot_sums(x, x, consts.ones, consts, False)[0].div_(x.numel() // x.shape[1])
        t = self._tick()
        slot = t % self.buffer_size
        self.buffer_x2[slot] = x2
        use_batch = t <= self.buffer_size or t < self.warmup_iters
        s2 = x2 if use_batch else _ring_mean(self.buffer_x2, consts)
        var = s2 + consts.eps
        inv_std = var.rsqrt()
        if t > max(self.renorm_iters, self.warmup_iters):
            # r = clip(sqrt(s2 + eps) / sqrt(running_var + eps)), running_var before
            # this step's update; q = r / sqrt(s2 + eps)
            r = var.div_(_cast(self.running_var, var.dtype) + consts.eps).sqrt_()
            q = r.clamp_(1 / self.r_max, self.r_max).mul_(inv_std)
        else:
            q = inv_std
        self.running_var.lerp_(_cast(s2, self.running_var.dtype), self.momentum)
        return _Step(q, inv_std.square().neg_(), slot, use_batch)

    def eval_scale_shift(self):
        """Eval map ``y = scale * x + shift`` as (C,) tensors in fp32 (fp64 for a
        float64 layer), differentiable in weight and bias:
        ``scale = w / sqrt(running_var + eps)``, ``shift = b``."""
        dtype = _stat_dtype(self.running_var.dtype)
        scale = (self.running_var.to(dtype) + self.eps).rsqrt()
        if not self.affine:
            return scale, torch.zeros_like(scale)
        return scale * self.weight.to(dtype), self.bias.to(dtype, copy=True)

    def batchnorm_state(self) -> dict:
        """State dict of the ``nn.BatchNorm2d`` with this layer's eval map
        (``running_mean`` 0, ``running_var`` the second moment)."""
        state = dict(running_mean=torch.zeros_like(self.running_var),
                     running_var=self.running_var.detach().clone(),
                     num_batches_tracked=self.num_batches_tracked.detach().clone())
        if self.affine:
            state.update(weight=self.weight.detach().clone(),
                         bias=self.bias.detach().clone())
        return state

    @classmethod
    def from_batchnorm(cls, bn, **mabn_kwargs) -> 'MABN':
        """An affine MABN whose eval output equals ``bn``'s eval output.

        ``bn``: any BN-like layer with ``running_mean``, ``running_var``, ``eps`` and
        (optional) ``weight``/``bias``, e.g. ``nn.BatchNorm2d`` or mmdet's FrozenBN.
        The counter and ring buffers start at zero (a fresh warm-up); ``eps``
        defaults to ``bn.eps``.
        """
        mabn_kwargs.setdefault('eps', bn.eps)
        mabn_kwargs['affine'] = True
        ref = bn.running_var
        layer = cls(bn.num_features, device=ref.device, dtype=ref.dtype, **mabn_kwargs)
        weight, bias, second_moment = _map_bn_statistics(
            getattr(bn, 'weight', None), getattr(bn, 'bias', None), bn.running_mean,
            bn.running_var, bn.eps, layer.eps)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            layer.running_var.copy_(second_moment)
        return layer

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        if prefix + 'running_mean' in state_dict and prefix + 'buffer_x2' not in state_dict:
            self._absorb_batchnorm_state(state_dict, prefix)
        self._check_ring_buffers(state_dict, prefix)
        self._host.update(step=None, compiled=None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def _check_ring_buffers(self, state_dict, prefix) -> None:
        """A checkpoint's ring buffers must have this layer's ``buffer_size`` rows: a
        partial load would leave the counter out of step with zeroed buffers."""
        for key in ('buffer_x2', 'buffer_gz'):
            saved = state_dict.get(prefix + key)
            if saved is not None and tuple(saved.shape) != tuple(getattr(self, key).shape):
                raise RuntimeError(
                    f'MABN ({prefix!r}): the checkpoint\'s {key} has shape '
                    f'{tuple(saved.shape)}, this layer\'s {tuple(getattr(self, key).shape)} '
                    f'(buffer_size, num_features). Set buffer_size={saved.shape[0]} in '
                    'norm_cfg to continue the moving averages, or delete the MABN '
                    'entries buffer_x2, buffer_gz and num_batches_tracked from the '
                    'checkpoint to restart them')

    def _absorb_batchnorm_state(self, state_dict, prefix) -> None:
        """Rewrite a plain BN layer's entries of ``state_dict`` into MABN's, eval-exactly
        (BN's eps assumed equal to this layer's)."""
        if not self.affine:
            raise RuntimeError(f'MABN ({prefix!r}): a BatchNorm state dict can only be '
                               f'loaded exactly into an affine MABN (affine=True)')
        warnings.warn('MABN: loading BatchNorm statistics with the eval-exact mapping '
                      '(running_var := var + mean^2, mean absorbed into weight and '
                      'bias); counter and ring buffers restart. ConvWC layers change '
                      'outputs approximately: measure with mmdet_bnplug.transforms.mabn_from_bn.')
        mean = state_dict[prefix + 'running_mean']
        weight, bias, second_moment = _map_bn_statistics(
            state_dict.get(prefix + 'weight'), state_dict.get(prefix + 'bias'), mean,
            state_dict[prefix + 'running_var'], self.eps, self.eps)
        state_dict.update({
            prefix + 'weight': weight, prefix + 'bias': bias,
            prefix + 'running_mean': torch.zeros_like(mean),
            prefix + 'running_var': second_moment,
            prefix + 'num_batches_tracked': torch.zeros_like(self.num_batches_tracked),
            prefix + 'buffer_x2': torch.zeros_like(self.buffer_x2),
            prefix + 'buffer_gz': torch.zeros_like(self.buffer_gz)})


def _map_bn_statistics(weight, bias, mean, var, bn_eps: float, mabn_eps: float):
    """BN eval map -> MABN ``(weight, bias, running_var)`` with the same eval map
    (computed in float64, returned in ``var``'s dtype)::

        running_var = var + mean^2
        weight      = w * sqrt(running_var + mabn_eps) / sqrt(var + bn_eps)
        bias        = b - w * mean / sqrt(var + bn_eps)
    """
    mean64, var64 = mean.detach().double(), var.detach().double()
    w64 = torch.ones_like(mean64) if weight is None else weight.detach().double()
    b64 = torch.zeros_like(mean64) if bias is None else bias.detach().double()
    inv_std = (var64 + bn_eps).rsqrt()
    second_moment = var64 + mean64.square()
    new_weight = w64 * (second_moment + mabn_eps).sqrt() * inv_std
    new_bias = b64 - w64 * mean64 * inv_std
    return tuple(t.to(var.dtype) for t in (new_weight, new_bias, second_moment))

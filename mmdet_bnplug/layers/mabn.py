"""MABN: moving-average batch normalisation (Yan et al., ICLR 2020).

Normalises by the second moment E[x^2] (no mean-centring; pair it with ``ConvWC``),
replaces batch statistics in the forward *and* backward pass by simple moving averages
over the last ``buffer_size`` iterations, and renormalises towards ``running_var`` like
Batch Renormalisation. In eval mode it is BN's per-channel affine map with a zero mean.
A training step is the ``torch.library`` ops of ``mmdet_bnplug.ops.mabn`` (C++ kernels on
CPU when built, a PyTorch implementation elsewhere: same arithmetic). User guide:
``docs/mabn.md``; the algorithm line by line: ``mmdet_bnplug.testing.mabn_reference``.
"""
import warnings

import torch
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import mabn as mabn_ops
from ..utils.checks import check_bool, check_int, check_real
from ..utils.recompute import inside_backward
from ..utils.tensors import stat_dtype


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
        # host-side, outside the ops, mutated in place (cheaper than Module.__setattr__):
        # 'step': the last training step's (coeffs, step) of mabn_train_stats, reused
        # when activation checkpointing re-runs the forward inside the backward pass
        self._host = dict(step=None)

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
            self._host['step'] = None

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
        return self._train_step(x)

    def _train_step(self, x: torch.Tensor) -> torch.Tensor:
        """The training step by the ops (``mmdet_bnplug.ops.mabn``): ``mabn_train``
        advances the statistics, unless activation checkpointing re-runs the forward
        inside the backward: then ``mabn_train_affine`` recomputes the output from the
        recorded step's constants and no state changes. (Under torch.compile every
        call is a fresh step.)"""
        host = self._host
        compiling = torch.compiler.is_compiling()
        if host['step'] is not None and inside_backward():  # False while compiling
            return mabn_ops.train_affine(x, self.weight, self.bias, *host['step'],
                                         self.buffer_gz, self.warmup_iters)
        y, coeffs, step = mabn_ops.train(x, self.weight, self.bias, self.running_var,
                                         self.num_batches_tracked, self.buffer_x2,
                                         self.buffer_gz, self.eps, self.momentum, self.r_max,
                                         self.warmup_iters, self.renorm_iters)
        if not compiling:
            host['step'] = (coeffs, step)
        return y

    def eval_scale_shift(self):
        """Eval map ``y = scale * x + shift`` as (C,) tensors in fp32 (fp64 for a
        float64 layer), differentiable in weight and bias:
        ``scale = w / sqrt(running_var + eps)``, ``shift = b``."""
        dtype = stat_dtype(self.running_var.dtype)
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
        self._host['step'] = None
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

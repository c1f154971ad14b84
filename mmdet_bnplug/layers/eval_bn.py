"""EvalBN: batch norm whose running statistics never change, in any mode."""
import torch
import torch.nn.functional as F
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.checks import check_bn_args
from ..utils.tensors import cast, channel_view, stat_dtype

# Below this many input elements the native kernel's saved input is negligible and
# beats a Python autograd Function on time: the frozen path uses it there too.
_NATIVE_BELOW = 1 << 18


def _trains(param):
    return param is not None and param.requires_grad


class _FrozenAffine(torch.autograd.Function):
    """``y = scale * x + shift`` with constant scale/shift: saves only ``scale`` (C,)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, scale):
        ctx.save_for_backward(scale)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        scale, = ctx.saved_tensors
        dx = grad * channel_view(cast(scale, grad.dtype), grad.dim())
        return dx, None, None, None, None, None, None


@MODELS.register_module()
class EvalBN(_BatchNorm):
    """Frozen batch norm: ``y = (x - running_mean) / sqrt(running_var + eps) * w + b``.

    The running statistics are used and never updated, in training and eval mode alike
    (``momentum`` is accepted for signature compatibility with ``nn.BatchNorm2d`` and
    stored as 0). The affine ``weight``/``bias`` train unless ``requires_grad=False``;
    then the layer is a constant per-channel affine map, and (for inputs of 2**18
    elements or more) its backward pass is a single multiply that keeps no activation
    alive. Loads ``nn.BatchNorm2d``, ``SyncBatchNorm``
    and mmdet ``FrozenBN`` state dicts with ``strict=True``.

    Input ``(N, C, *)`` of any rank >= 2 and any floating dtype; the output has the
    input's dtype (fp16/bf16 inputs are normalised with fp32 statistics), also under
    autocast and when the layer's own tensors have another dtype than the input.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        check_bn_args('EvalBN', num_features, eps, momentum, affine, track_running_stats)
        if not track_running_stats:
            raise ValueError('EvalBN normalises with its running statistics: '
                             'track_running_stats must be True, got False')
        super().__init__(num_features, eps, momentum, affine, True, device, dtype)
        self.momentum = 0.0  # the statistics never move

    def _check_input_dim(self, x):
        if x.dim() < 2 or x.size(1) != self.num_features:
            raise ValueError(f'EvalBN({self.num_features}) expects input of shape '
                             f'(N, {self.num_features}, *), got {tuple(x.shape)}')

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # mmdet's FrozenBN (and some converted checkpoints) have no num_batches_tracked.
        state_dict.setdefault(prefix + 'num_batches_tracked',
                              self.num_batches_tracked.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        self._check_input_dim(x)
        mean, var, weight, bias = self.running_mean, self.running_var, self.weight, self.bias
        dtype = stat_dtype(x.dtype)
        if var.dtype != dtype or (weight is not None and weight.dtype != dtype):
            mean, var, weight, bias = (cast(t, dtype) for t in (mean, var, weight, bias))
        if (x.requires_grad and x.numel() >= _NATIVE_BELOW and torch.is_grad_enabled()
                and not _trains(self.weight) and not _trains(self.bias)):
            scale = torch.rsqrt(var + self.eps)
            if weight is not None:
                scale = scale * weight
            return _FrozenAffine.apply(x, mean, var, weight, bias, self.eps, scale)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)

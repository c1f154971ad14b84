"""What counts as a BN-like layer, and its eval-mode per-channel affine map.

One predicate serves the norm_eval mixin, the conversion/fuse helpers, the inspection
tool and the check hook, so they always agree on which layers they act on.
"""
import functools

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@functools.lru_cache(maxsize=None)
def bn_like_types():
    """Tuple of the BN-like base classes.

    torch's ``_BatchNorm`` family (BatchNorm1d/2d/3d, SyncBatchNorm, and this package's
    layers, which subclass it) plus mmdet's ``FrozenBN`` (``FrozenBatchNorm2d``), which is
    a plain ``nn.Module`` with BN's buffers.
    """
    try:
        from mmdet.models.layers.brick_wrappers import FrozenBatchNorm2d
    except ImportError:  # mmdet missing: only the _BatchNorm family exists
        return (_BatchNorm, )
    return (_BatchNorm, FrozenBatchNorm2d)


def is_bn_like(module: nn.Module) -> bool:
    """Whether ``module`` is a BN-like layer (see :func:`bn_like_types`)."""
    return isinstance(module, bn_like_types())


def bn_like_layers(model: nn.Module):
    """``(name, layer)`` for every BN-like layer below ``model`` (``modules()`` order)."""
    return [(name, m) for name, m in model.named_modules() if is_bn_like(m)]


def layer_state(layer: nn.Module) -> dict:
    """Detached copies of the layer's own buffers (its statistics), by buffer name."""
    return {
        name: buf.detach().clone()
        for name, buf in layer.named_buffers(recurse=False) if buf is not None
    }


def eval_affine(layer: nn.Module):
    """The layer's eval-mode map ``y = scale * x + shift`` as ``(scale, shift)``.

    Both of shape ``(C,)`` in float32 (float64 if the layer is float64), differentiable
    with respect to the layer's weight and bias. Layers whose map is not BN's formula
    define ``eval_scale_shift()`` (the package's folding protocol), which is used as is.
    """
    if hasattr(layer, 'eval_scale_shift'):
        return layer.eval_scale_shift()
    mean, var = layer.running_mean, layer.running_var
    if mean is None or var is None:
        raise ValueError(
            f'{type(layer).__name__} has no running statistics '
            '(track_running_stats=False), so it is not a fixed affine map in eval mode')
    dtype = torch.promote_types(var.dtype, torch.float32)
    scale = torch.rsqrt(var.to(dtype) + layer.eps)
    weight, bias = getattr(layer, 'weight', None), getattr(layer, 'bias', None)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift

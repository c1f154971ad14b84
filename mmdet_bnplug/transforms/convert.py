"""Convert BN-like layers between registered types, in place (BN <-> EvalBN <->
PortableSyncBN <-> MABN <-> mmdet FrozenBN, ...), carrying statistics and affine over."""
import fnmatch
import inspect

import torch
from mmengine.logging import print_log
from mmengine.registry import MODELS
from torch import nn

from ..layers.level_norm import retie_level_norms
from ..layers.norm_eval import resolve_registered
from ..utils.bn_like import bn_like_layers, bn_like_types, eval_affine
from ..utils.modules import replace_modules


def norm_targets():
    """Names of every registered BN-like class (other scopes as ``scope.Name``)."""
    found, pending = [], [MODELS]
    while pending:
        registry = pending.pop()
        prefix = '' if registry is MODELS else f'{registry.scope}.'
        found += [prefix + name for name, obj in registry.module_dict.items()
                  if inspect.isclass(obj) and issubclass(obj, bn_like_types())]
        pending += list(registry.children.values())
    return sorted(found)


def _resolve_target(to):
    """``(class, kwargs, requires_grad)`` from a name, a class or a norm_cfg dict."""
    kwargs = dict(to) if isinstance(to, dict) else {'type': to}
    type_ = kwargs.pop('type', None)
    requires_grad = kwargs.pop('requires_grad', None)
    cls = resolve_registered(type_)[0] if isinstance(type_, (str, type)) else None
    if not (inspect.isclass(cls) and issubclass(cls, bn_like_types())):
        raise ValueError(f'convert_norm: unknown target type {type_!r}; accepted: '
                         f'{", ".join(norm_targets())} (a registered name, class, or a '
                         'norm_cfg dict such as dict(type="EvalBN", requires_grad=False))')
    return cls, kwargs, requires_grad


def _select(model, include, exclude):
    """Names of the BN-like layers matching ``include`` and not ``exclude`` (globs)."""
    names = [name for name, _ in bn_like_layers(model)]
    if not names:
        raise ValueError('convert_norm: the model has no BN-like layers')
    selected = set(names)
    for key, patterns in (('include', include), ('exclude', exclude)):
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f'convert_norm: {key} pattern {pattern!r} matches no '
                                 f'BN-like layer; layers are e.g. {names[:3]}')
        if patterns:
            hits = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
            selected = selected & hits if key == 'include' else selected - hits
    if not selected:
        raise ValueError('convert_norm: include/exclude leave no layer to convert')
    return [n for n in names if n in selected]


def _copy_state(dst, state):
    """Copy the tensors of ``state`` into ``dst``'s same-named parameters/buffers."""
    with torch.no_grad():
        for key, tensor in dst.state_dict(keep_vars=True).items():
            if key in state:
                tensor.copy_(state[key])


def _convert_layer(src, cls, kwargs, requires_grad):
    if getattr(src, 'running_mean', None) is None and not hasattr(src, 'batchnorm_state'):
        raise ValueError(f'convert_norm: {type(src).__name__} has no running statistics '
                         '(track_running_stats=False) to carry over')
    state = src.batchnorm_state() if hasattr(src, 'batchnorm_state') else src.state_dict()
    weight = getattr(src, 'weight', None)
    ref = src.running_var if src.running_var is not None else weight
    init = dict(eps=src.eps, affine=weight is not None)
    if hasattr(cls, 'from_batchnorm'):  # e.g. MABN: eval-exact from a plain BN
        bn = nn.BatchNorm2d(src.num_features, **init, device=ref.device, dtype=ref.dtype)
        _copy_state(bn, state)
        dst = cls.from_batchnorm(bn, **kwargs)
    else:
        dst = cls(src.num_features, **{**init, **kwargs})
        _copy_state(dst, state)
    dst.to(device=ref.device, dtype=ref.dtype)
    for name, param in dst.named_parameters(recurse=False):
        old = getattr(src, name, None)
        param.requires_grad_(requires_grad if requires_grad is not None else
                             isinstance(old, nn.Parameter) and old.requires_grad)
    return dst.train(src.training)


def _map_change(src, dst):
    """Max relative change of the eval-mode map ``scale * x + shift`` (0 when exact)."""
    with torch.no_grad():
        (s0, t0), (s1, t1) = eval_affine(src), eval_affine(dst)
        scale = max(s0.abs().max().item(), 1e-12)
        return max((s1.double() - s0.double()).abs().max().item() / scale,
                   (t1.double() - t0.double()).abs().max().item() /
                   max(t0.abs().max().item(), scale))


def convert_norm(model: nn.Module, to, include=None, exclude=None) -> nn.Module:
    """Replace BN-like layers of ``model`` by layers of type ``to``, in place.

    Args:
        model: the model (a BN-like root is replaced too: use the return value).
        to: a registered name (``'EvalBN'``, ``'BN'``, ``'MABN'``, ``'PortableSyncBN'``,
            ``'mmdet.FrozenBN'``, ...), a class, or a norm_cfg dict with constructor
            kwargs and optionally ``requires_grad``.
        include, exclude: glob pattern(s) on module names (``'backbone.layer1.*'``);
            every pattern must match at least one BN-like layer.

    Statistics, weight and bias are carried over, as are ``eps``, ``affine``, the
    training flag, device, dtype and each parameter's ``requires_grad`` (unless
    ``to`` sets ``requires_grad``); other hyper-parameters (``momentum``, ...) take the
    target's defaults or the kwargs in ``to``. Targets with ``from_batchnorm`` (MABN)
    are built through it; sources with ``batchnorm_state`` give their BN-equivalent
    state. When MABN layers become another type, every ConvWC of the model stores its
    centred kernel (:func:`centre_conv_wc_weights`), so that the converted weights are
    exact in a plain-conv config too. The levels of a LevelNorm are converted one by
    one (a shared affine stays shared). The largest change of any layer's eval-mode map
    is logged.
    """
    cls, kwargs, requires_grad = _resolve_target(to)
    old_to_new, changes, from_mabn = {}, [], False
    for name in _select(model, include, exclude):
        src = model.get_submodule(name)
        from_mabn |= hasattr(src, 'eval_scale_shift')
        old_to_new[id(src)] = dst = _convert_layer(src, cls, kwargs, requires_grad)
        changes.append((_map_change(src, dst), name or '<root>'))
    worst, where = max(changes)
    change = (f'largest relative change of an eval-mode map: {worst:.1e} ({where})'
              if worst > 0 else 'eval-mode maps unchanged')
    if from_mabn and not hasattr(cls, 'from_batchnorm'):
        baked = centre_conv_wc_weights(model)
        if baked:
            change += (f'; {baked} ConvWC layers now store their centred kernels (same '
                       'outputs; the weights also load into plain convs)')
    print_log(f'convert_norm: {len(changes)} layers -> {cls.__name__}; {change}',
              logger='current')
    model = replace_modules(model, old_to_new)
    retie_level_norms(model)  # per-level norms sharing one affine share it again
    return model


def centre_conv_wc_weights(model: nn.Module) -> int:
    """Store every ConvWC's centred kernel as its ``weight``, in place; the count.

    Exact: centring is idempotent, so each ConvWC computes what it computed before, and
    a plain conv loading these weights computes the same. Used when MABN layers become
    plain BN-like layers, whose configs usually have plain convs.
    """
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.conv._ConvNd) and \
                    hasattr(module, 'centred_weight'):
                module.weight.copy_(module.centred_weight)
                count += 1
    return count

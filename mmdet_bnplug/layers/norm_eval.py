"""An enforced ``norm_eval`` for any backbone: ``NormEvalMixin`` and the ``NormEval`` builder.

mmdet backbones implement ``norm_eval`` in ``train()`` only, and some only for
``nn.BatchNorm2d``. The mixin covers every BN-like layer (:mod:`mmdet_bnplug.utils.bn_like`)
found by walking ``modules()``, and each such layer re-asserts eval mode before its own
forward, so a later ``.train()`` call on a submodule cannot let statistics move.
"""
import fnmatch
import functools
import inspect

from mmengine.registry import MODELS, DefaultScope
from torch import nn

from ..utils.bn_like import bn_like_types
from ..utils.checks import check_bool

_MARK = '_bnplug_norm_eval'  # per-layer flag read by the layer's own forward pre-hook
_BY = '_bnplug_norm_eval_by'  # per-layer: who enforces it (shown by inspect_norms)


def _keep_eval(layer, args):
    """Forward pre-hook of a BN-like layer: back to eval mode if norm_eval applies."""
    if layer.training and getattr(layer, _MARK, False):
        layer.train(False)


def settle_norm_eval(model: nn.Module) -> None:
    """Put every layer on which ``norm_eval`` is enforced in eval mode now, as its forward
    pre-hook would at its next forward (after a ``train()`` call that flipped it)."""
    for layer in model.modules():
        if getattr(layer, _MARK, False) and layer.training:
            layer.train(False)


def enforced_by(layer: nn.Module):
    """Who enforces ``norm_eval`` on ``layer`` (a short text), or None."""
    return getattr(layer, _BY, None) if getattr(layer, _MARK, False) else None


def apply_norm_eval(model: nn.Module, norm_eval: bool = True, freeze_affine: bool = False,
                    include=None, by: str = 'apply_norm_eval') -> list:
    """Enforce ``norm_eval`` on the BN-like layers below ``model`` (``modules()`` walk);
    returns their names.

    With ``norm_eval`` each layer is put in eval mode now and, through a forward pre-hook
    on the layer itself, again before each of its forwards, whatever ``train()`` calls
    happen in between. ``freeze_affine`` sets ``requires_grad=False`` on the layers'
    weight and bias. ``include`` (glob patterns on names relative to ``model``, e.g.
    ``'neck.*'``) restricts it to the matching layers; ``by`` is recorded for reports.
    Calling it again with ``norm_eval=False`` lifts the guarantee.
    """
    types = bn_like_types()
    patterns = None if include is None else (
        [include] if isinstance(include, str) else list(include))
    applied = []
    for name, layer in model.named_modules():
        if not isinstance(layer, types):
            continue
        if patterns is not None and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if not hasattr(layer, _MARK):
            layer.register_forward_pre_hook(_keep_eval)
        setattr(layer, _MARK, bool(norm_eval))
        setattr(layer, _BY, by)
        if norm_eval and layer.training:
            layer.train(False)
        if freeze_affine:
            for param in layer.parameters(recurse=False):
                param.requires_grad_(False)
        applied.append(name)
    return applied


def _reassert_norm_eval(module, args):
    """Forward pre-hook of the mixin: covers layers swapped in since the last ``train()``."""
    apply_norm_eval(module, module.norm_eval, module.freeze_affine,
                    by=f'NormEval({type(module).__name__})')


class NormEvalMixin:
    """Backbone mixin: ``norm_eval`` enforced on every BN-like layer below the module.

    Use as ``class MyBackbone(NormEvalMixin, BaseModule)`` or through the ``NormEval``
    builder. Keyword arguments: ``norm_eval`` (bool, default True) keeps every BN-like
    layer in eval mode (statistics frozen) whatever ``train()`` calls happen, on the
    backbone or on any submodule (see :func:`apply_norm_eval`); ``freeze_affine`` (bool,
    default False) also sets ``requires_grad=False`` on their weight and bias. If the
    wrapped class itself takes ``norm_eval``, it gets the same value. Adds no parameters
    or buffers: state-dict keys are unchanged. Set ``norm_eval`` and call ``train()`` to
    change the setting later.
    """

    def __init__(self, *args, norm_eval=True, freeze_affine=False, **kwargs):
        check_bool(f'NormEval({type(self).__name__})', 'norm_eval', norm_eval)
        check_bool(f'NormEval({type(self).__name__})', 'freeze_affine', freeze_affine)
        if 'norm_eval' in inspect.signature(super().__init__).parameters:
            kwargs['norm_eval'] = norm_eval
        super().__init__(*args, **kwargs)
        self.norm_eval = bool(norm_eval)
        self.freeze_affine = bool(freeze_affine)
        apply_norm_eval(self, self.norm_eval, self.freeze_affine,
                        by=f'NormEval({type(self).__name__})')
        self.register_forward_pre_hook(_reassert_norm_eval)

    def train(self, mode=True):
        super().train(mode)
        apply_norm_eval(self, self.norm_eval, self.freeze_affine,
                        by=f'NormEval({type(self).__name__})')
        return self


@functools.lru_cache(maxsize=None)
def norm_eval_class(cls: type) -> type:
    """``cls`` with :class:`NormEvalMixin` in front (one class per wrapped class)."""
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise TypeError(f'NormEval wraps nn.Module backbones, got {cls!r}')
    if issubclass(cls, NormEvalMixin):
        return cls
    return type(f'NormEval{cls.__name__}', (NormEvalMixin, cls),
                {'__module__': cls.__module__, '__doc__': cls.__doc__})


def resolve_registered(type_, scope=None):
    """``(class, scope)`` for a registered name (a class passes through), or ``(None, None)``.

    Looked up like mmengine's builders: in ``scope`` or the current default scope and its
    parents; with no scope given or set, in the root registry and then mmdet's.
    """
    if inspect.isclass(type_):
        return type_, scope
    no_scope = scope is None and DefaultScope.get_current_instance() is None
    for try_scope in ((None, 'mmdet') if no_scope else (scope, )):
        with MODELS.switch_scope_and_registry(try_scope) as registry:
            cls = registry.get(type_)
        if cls is not None:
            return cls, try_scope
    return None, None


@MODELS.register_module(name='NormEval')
def build_norm_eval(backbone: dict, norm_eval: bool = True, freeze_affine: bool = False):
    """Build the registered backbone ``backbone`` (a config dict) with the mixin added.

    The result is an instance of a subclass of the backbone's class (so ``isinstance``,
    ``init_weights`` and the state-dict keys are those of the plain backbone). ``type``
    may be a registered name (resolved in the current scope; with no default scope set,
    in the root registry and then mmdet's) or a class. A ``norm_eval`` inside
    ``backbone`` must agree with the wrapper's.

    Example (config)::

        backbone=dict(type='NormEval', norm_eval=True, freeze_affine=False,
                      backbone=dict(type='ResNet', depth=50, ...))
    """
    check_bool('NormEval', 'norm_eval', norm_eval)
    check_bool('NormEval', 'freeze_affine', freeze_affine)
    cfg = dict(backbone)
    if 'type' not in cfg:
        raise KeyError(f'NormEval: backbone config needs a "type", got {cfg}')
    bb_type, scope = cfg.pop('type'), cfg.pop('_scope_', None)
    inner = cfg.pop('norm_eval', norm_eval)
    if bool(inner) != bool(norm_eval):
        raise ValueError(f'NormEval: norm_eval={norm_eval} but the wrapped backbone '
                         f'config says norm_eval={inner}; set it once, on NormEval')
    cls, scope = resolve_registered(bb_type, scope)
    if cls is not None:
        with MODELS.switch_scope_and_registry(scope):
            return norm_eval_class(cls)(**cfg, norm_eval=norm_eval, freeze_affine=freeze_affine)
    current = DefaultScope.get_current_instance()
    raise KeyError(
        f'NormEval: backbone type {bb_type!r} is not registered in MODELS '
        f'(default scope: {current.scope_name if current else None}). Import the package '
        'that registers it (custom_imports), set default_scope, or write it with its '
        "scope, e.g. 'mmdet.ResNet'")

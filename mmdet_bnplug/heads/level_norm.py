"""Detection heads with per-level norm statistics: the head's shared convs stay shared
across FPN levels, each BN-like norm becomes a :class:`~mmdet_bnplug.layers.LevelNorm`.

Selected in a config by the head's type, everything else as mmdet's head::

    bbox_head=dict(type='LevelNormRetinaHead', norm_cfg=dict(type='MABN', ...), ...)

``LevelNormRetinaHead``, ``LevelNormFCOSHead``, ``LevelNormATSSHead`` and
``LevelNormRPNHead`` (mmdet's RPNHead with ``norm_cfg``/``conv_cfg`` for its convs) are
registered; :func:`level_norm_head_class` makes the same for another head whose
``forward`` maps ``forward_single`` over the levels (mmdet's ``multi_apply``).

The level is known, not counted: ``forward(x)`` records the tuple of level features,
and ``forward_single`` finds its input in it by identity and sets that level
(:func:`~mmdet_bnplug.layers.level_norm.at_level`) while it runs. A feature tuple whose
length is not the head's number of levels (its prior generator's), or a
``forward_single`` input that is not one of the features, is refused; a LevelNorm run
outside this routing (e.g. recomputed by a checkpoint the head did not set up) raises.
``with_cp=True`` checkpoints each level's ``forward_single`` with the level restored on
recomputation.
"""
import copy

from mmcv.cnn import ConvModule
from mmdet.models.dense_heads import ATSSHead, FCOSHead, RetinaHead, RPNHead
from mmengine.registry import MODELS
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.level_norm import LevelNorm, at_level
from ..utils.bn_like import bn_like_layers
from ..utils.checks import check_bool
from ..utils.modules import replace_modules

_FEATURES = '_bnplug_level_features'


def _num_levels(head) -> int:
    generator = getattr(head, 'prior_generator', None)
    levels = getattr(generator, 'num_levels', None)
    if not isinstance(levels, int):
        raise ValueError(f'{type(head).__name__}: per-level norms need the number of FPN '
                         'levels, read from the head prior_generator.num_levels; this head '
                         'has none')
    return levels


def split_levels(head: nn.Module, num_levels: int, shared_affine: bool) -> list:
    """Replace every BN-like layer of ``head`` by a LevelNorm of ``num_levels`` copies of
    it (level 0 the layer itself), in place; returns the replaced layers' names."""
    replaced, names = {}, []
    for name, layer in bn_like_layers(head):
        if id(layer) not in replaced:
            copies = [layer] + [copy.deepcopy(layer) for _ in range(num_levels - 1)]
            replaced[id(layer)] = LevelNorm(copies, shared_affine)
            names.append(name)
    replace_modules(head, replaced)
    return names


class LevelNormHeadMixin:
    """Per-level norm statistics for a head class (first base, before the mmdet head).

    Args (besides the head's own):
        shared_affine: the levels share one affine (level 0's weight and bias) instead
            of one each; default False, as mmdet's RetinaSepBNHead.
        with_cp: activation-checkpoint each level's ``forward_single`` in training.
    """

    def __init__(self, *args, shared_affine: bool = False, with_cp: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        owner = type(self).__name__
        check_bool(owner, 'shared_affine', shared_affine)
        check_bool(owner, 'with_cp', with_cp)
        self.num_levels = _num_levels(self)
        self.shared_affine, self.with_cp = shared_affine, with_cp
        self.level_norm_names = split_levels(self, self.num_levels, shared_affine)
        if not self.level_norm_names:
            raise ValueError(f'{owner}: the head has no norm layer with batch statistics '
                             '(BN-like) to split per level; set its norm_cfg, e.g. '
                             "dict(type='BN', requires_grad=True)")

    def forward(self, x, *args, **kwargs):
        """The head's ``forward`` on ``x``, a tuple of ``num_levels`` feature maps."""
        feats = tuple(x)
        if len(feats) != self.num_levels:
            raise ValueError(f'{type(self).__name__}: got {len(feats)} feature levels, its '
                             f'per-level norms hold {self.num_levels} (the prior '
                             "generator's): a level left out cannot be routed safely")
        outer = self.__dict__.get(_FEATURES)
        self.__dict__[_FEATURES] = feats
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self.__dict__[_FEATURES] = outer

    def forward_single(self, x, *args, **kwargs):
        """The head's ``forward_single`` at the level whose feature ``x`` is."""
        feats = self.__dict__.get(_FEATURES)
        level = None if feats is None else next(
            (i for i, f in enumerate(feats) if f is x), None)
        if level is None:
            raise RuntimeError(
                f'{type(self).__name__}: forward_single called on a tensor that is not one '
                "of the features passed to the head's forward, so its FPN level is "
                'unknown; call the head itself on the tuple of level features')
        run = super().forward_single
        if self.with_cp and self.training and x.requires_grad:
            store = {}
            return checkpoint(run, x, *args, use_reentrant=False, **kwargs,
                              context_fn=lambda: (at_level(level, store),
                                                  at_level(level, store, replay=True)))
        with at_level(level):
            return run(x, *args, **kwargs)


def level_norm_head_class(cls: type, name=None) -> type:
    """The per-level-norm variant of head class ``cls``, named ``name`` (default
    ``LevelNorm<cls name>``); register it in MODELS to use it from a config."""
    return type(name or f'LevelNorm{cls.__name__}', (LevelNormHeadMixin, cls), {
        '__doc__': f'{cls.__name__} with per-level norm statistics '
                   f'(:class:`{__name__}.LevelNormHeadMixin`).',
        '__module__': __name__})


class NormedRPNHead(RPNHead):
    """mmdet's RPNHead whose ``num_convs`` shared convs are ConvModules with
    ``conv_cfg`` and ``norm_cfg`` (mmdet's have no norm)."""

    def __init__(self, *args, conv_cfg=None, norm_cfg=None, **kwargs):
        self.conv_cfg, self.norm_cfg = conv_cfg, norm_cfg
        super().__init__(*args, **kwargs)

    def _init_layers(self) -> None:
        super()._init_layers()
        self.rpn_conv = nn.Sequential(*[
            ConvModule(self.in_channels if i == 0 else self.feat_channels,
                       self.feat_channels, 3, padding=1, conv_cfg=self.conv_cfg,
                       norm_cfg=self.norm_cfg, inplace=False)
            for i in range(self.num_convs)])


LevelNormRetinaHead = level_norm_head_class(RetinaHead)
LevelNormFCOSHead = level_norm_head_class(FCOSHead)
LevelNormATSSHead = level_norm_head_class(ATSSHead)
LevelNormRPNHead = level_norm_head_class(NormedRPNHead, 'LevelNormRPNHead')
for _cls in (NormedRPNHead, LevelNormRetinaHead, LevelNormFCOSHead, LevelNormATSSHead,
             LevelNormRPNHead):
    MODELS.register_module(module=_cls)

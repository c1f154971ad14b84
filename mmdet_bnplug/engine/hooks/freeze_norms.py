"""FreezeNormsHook: ``norm_eval`` (and optionally a frozen affine) on any part of a
model, chosen by module-name patterns in the config."""
import fnmatch

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...layers.norm_eval import apply_norm_eval
from ...utils.bn_like import bn_like_layers
from ...utils.checks import check_bool


def freeze_norms(model, include, exclude=(), freeze_affine=False, by='FreezeNormsHook'):
    """Enforce norm_eval on the BN-like layers of ``model`` whose names match ``include``
    and not ``exclude`` (glob patterns); every pattern must match a layer. Their names."""
    names = [name for name, _ in bn_like_layers(model)]
    for key, patterns in (('include', include), ('exclude', exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f'FreezeNormsHook: {key} pattern {pattern!r} matches no '
                                 f'BN-like layer; layers are e.g. {names[:3]}')
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return apply_norm_eval(model, True, freeze_affine, include=chosen, by=by)


def _patterns(name, value):
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f'FreezeNormsHook: {name} must be a glob pattern or a list of '
                         f'them (non-empty strings), got {value!r}')
    return patterns


@HOOKS.register_module()
class FreezeNormsHook(Hook):
    """Keep the BN-like layers matching ``include`` in eval mode for the whole run.

    The same guarantee as ``NormEval``: each chosen layer re-asserts eval mode before
    each of its forwards, so ``model.train()``, a submodule's ``.train()`` or any other
    code cannot let its statistics move. Applied before training (and before the
    other hooks' ``before_train``, so ``NormEvalCheckHook`` watches these layers too).

    Args:
        include (str | list[str]): glob patterns of module names, e.g. ``'neck.*'``,
            ``['backbone.*', 'roi_head.bbox_head.*']``; each must match a layer.
        exclude (str | list[str]): patterns to leave out. Default none.
        freeze_affine (bool): also ``requires_grad=False`` on their weight and bias.
    """

    priority = 'VERY_HIGH'

    def __init__(self, include, exclude=(), freeze_affine=False):
        self.include = _patterns('include', include)
        self.exclude = _patterns('exclude', exclude)
        if not self.include:
            raise ValueError('FreezeNormsHook: include must name at least one pattern')
        check_bool('FreezeNormsHook', 'freeze_affine', freeze_affine)
        self.freeze_affine = freeze_affine

    def apply(self, model):
        """Freeze the chosen layers of ``model``; their names."""
        return freeze_norms(model, self.include, self.exclude, self.freeze_affine,
                            by=f'FreezeNormsHook({", ".join(self.include)})')

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        names = self.apply(model)
        runner.logger.info(f'FreezeNormsHook: {len(names)} norm layers kept in eval mode'
                           + (' with frozen affine' if self.freeze_affine else '')
                           + f': {", ".join(names)}')

"""NormEvalCheckHook: fail (or warn) when a layer meant to be frozen is not."""
import fnmatch

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...analysis.norm_report import changed_buffers, frozen_by_type, frozen_layers
from ...utils.bn_like import bn_like_layers, layer_state


@HOOKS.register_module()
class NormEvalCheckHook(Hook):
    """Verify during training that frozen norm layers stay frozen.

    Layers meant to be frozen: EvalBN and mmdet FrozenBN layers, every BN-like layer below
    a module with ``norm_eval`` set (mmdet backbones, ``NormEval``), and the layers whose
    names match ``include``. Every ``interval`` training iterations and at the end of
    training it checks that they are in eval mode (not required of EvalBN/FrozenBN, whose
    statistics cannot move in any mode) and that their buffers (running statistics,
    ``num_batches_tracked``, ...) are bit-identical to their values at the start of
    training. A failure names the layers.

    Args:
        interval (int): check every ``interval`` training iterations. Default 50.
        action (str): ``'error'`` raises RuntimeError, ``'warn'`` logs a warning.
        include (list[str]): extra glob patterns of module names to treat as frozen,
            e.g. ``['backbone.layer1.*']`` for ResNet's ``frozen_stages=1``.
    """

    priority = 'LOW'

    def __init__(self, interval=50, action='error', include=()):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'NormEvalCheckHook: interval must be a positive int, got '
                             f'{interval!r}')
        if action not in ('error', 'warn'):
            raise ValueError(f"NormEvalCheckHook: action must be 'error' or 'warn', got "
                             f'{action!r}')
        self.interval = interval
        self.action = action
        self.include = [include] if isinstance(include, str) else list(include)
        if not all(isinstance(p, str) and p for p in self.include):
            raise ValueError('NormEvalCheckHook: include must be a glob pattern or a list '
                             f'of them (non-empty strings), got {include!r}')
        self._watched = {}

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        names = [name for name, _ in bn_like_layers(model)]
        for pattern in self.include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ValueError(f'NormEvalCheckHook: include pattern {pattern!r} matches '
                                 f'no BN-like layer; layers are e.g. {names[:3]}')
        frozen = frozen_layers(model, self.include)
        self._watched = {name: (model.get_submodule(name), why,
                                layer_state(model.get_submodule(name)))
                         for name, why in frozen.items()}
        if not self._watched:
            runner.logger.warning('NormEvalCheckHook: no layer is meant to be frozen '
                                  '(no EvalBN/FrozenBN, no norm_eval, no include match)')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.every_n_train_iters(runner, self.interval):
            self._check(runner)

    def after_train(self, runner):
        self._check(runner)

    def _check(self, runner):
        problems, largest = [], 0.0
        for name, (layer, why, start) in self._watched.items():
            if layer.training and not frozen_by_type(layer):
                problems.append(f'{name} ({type(layer).__name__}, {why}) is in training mode')
            moved = changed_buffers(layer, start)
            if moved:
                largest = max(largest, *moved.values())
                problems.append(f'{name} ({type(layer).__name__}, {why}): ' + ', '.join(
                    f'{k} changed by up to {v:.3g}' for k, v in moved.items()))
        if not problems:
            if self._watched:
                runner.logger.info(
                    f'NormEvalCheckHook at iteration {runner.iter}: {len(self._watched)} '
                    'layers meant to be frozen are in eval mode and their buffers are '
                    'unchanged since the start of training (largest change 0)')
            return
        message = (f'NormEvalCheckHook at iteration {runner.iter}: layers meant to be '
                   'frozen are not:\n  ' + '\n  '.join(problems))
        if self.action == 'error':
            raise RuntimeError(message)
        runner.logger.warning(message)

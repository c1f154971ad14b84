"""A test-only mmengine hook for the multi-node tests (test_multi_node.py), imported by
their config through ``custom_imports`` (this directory on PYTHONPATH).

Every rank saves to ``out_dir/rank<R>.pth``: its node (torchrun's ``GROUP_RANK``), the
model's state dict after training, and one norm layer's first training forward (input,
output, affine, running statistics before and after), from which the test recomputes
BN on a group's concatenated batch.
"""
import os
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


def _copy(tensor):
    return tensor.detach().clone()


@HOOKS.register_module()
class RankStateHook(Hook):
    """Saves this rank's state for the multi-node tests (see the module docstring)."""

    def __init__(self, out_dir, layer='backbone.bn1'):
        self.out_dir, self.layer = out_dir, layer
        self.first = {}
        self._handles = []

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner):
        layer = self._model(runner).get_submodule(self.layer)
        self._handles = [layer.register_forward_pre_hook(self._before),
                         layer.register_forward_hook(self._after)]

    def _before(self, layer, args):
        if not self.first:
            self.first = dict(input=_copy(args[0]), weight=_copy(layer.weight),
                              bias=_copy(layer.bias), mean_before=_copy(layer.running_mean),
                              var_before=_copy(layer.running_var))

    def _after(self, layer, args, output):
        if 'output' not in self.first:
            self.first.update(output=_copy(output), mean_after=_copy(layer.running_mean),
                              var_after=_copy(layer.running_var))

    def after_train(self, runner):
        for handle in self._handles:
            handle.remove()
        torch.save(dict(node=int(os.environ.get('GROUP_RANK', 0)), first=self.first,
                        state=self._model(runner).state_dict()),
                   osp.join(self.out_dir, f'rank{runner.rank}.pth'))

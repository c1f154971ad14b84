"""NormMomentumPerStepHook: BN-like running statistics that decay per optimizer step under
gradient accumulation."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...utils.bn_like import bn_like_layers
from ...utils.checks import check_int


def per_micro_batch_momentum(momentum: float, counts: int) -> float:
    """The momentum that, applied ``counts`` times, decays like ``momentum`` once:
    ``1 - (1 - momentum) ** (1 / counts)``."""
    return 1.0 - (1.0 - momentum)**(1.0 / counts)


@HOOKS.register_module()
class NormMomentumPerStepHook(Hook):
    """Make BN-like running statistics decay per optimizer step, not per micro-batch.

    With ``optim_wrapper.accumulative_counts=k`` every BN-like layer still runs once per
    micro-batch, and a running statistic with momentum ``m`` decays ``k`` times per
    optimizer step: its memory is ``k`` times shorter in steps than the config says.
    Before training, this hook sets each layer's momentum to
    ``1 - (1 - m) ** (1 / k)`` (EvalBN, mmdet FrozenBN and ``momentum=None``
    cumulative averages are left alone), so that ``k`` micro-batches move the statistics
    as one step with momentum ``m`` would. The forward still normalises by each
    micro-batch's statistics: accumulation does not enlarge BN's batch.

    Args:
        accumulative_counts (int, optional): ``k``; default: the optimizer wrapper's.
    """

    priority = 'VERY_HIGH'

    def __init__(self, accumulative_counts=None):
        if accumulative_counts is not None:
            check_int('NormMomentumPerStepHook', 'accumulative_counts',
                      accumulative_counts, 1)
        self.accumulative_counts = accumulative_counts

    def before_train(self, runner):
        counts = self.accumulative_counts or getattr(runner.optim_wrapper,
                                                     '_accumulative_counts', 1)
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        changed = 0
        for _, layer in bn_like_layers(model):
            momentum = getattr(layer, 'momentum', None)
            if counts > 1 and isinstance(momentum, float) and 0 < momentum < 1:
                layer.momentum = per_micro_batch_momentum(momentum, counts)
                changed += 1
        runner.logger.info(f'NormMomentumPerStepHook: accumulative_counts={counts}; '
                           f'momentum of {changed} norm layers set per micro-batch')

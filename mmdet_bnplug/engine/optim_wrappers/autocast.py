"""Mixed precision without CUDA: bf16 autocast on the CPU, for ``tools/train.py --amp``.

mmengine's ``AmpOptimWrapper`` refuses to start without CUDA/NPU/MLU/MUSA. On the CPU the
low-precision type is bfloat16, which has fp32's exponent range: gradients do not
underflow, so no loss scaling is needed and the optimizer steps as usual.
"""
import contextlib

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS

from ...utils.checks import check_choice


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward context is ``torch.autocast(device_type, dtype)``.

    Args:
        dtype (str): ``'bfloat16'`` (default) or ``'float16'``; float16 without loss
            scaling can underflow gradients: use mmengine's AmpOptimWrapper on a GPU.
        device_type (str): ``'cpu'`` (default) or ``'cuda'``.
        **kwargs: ``OptimWrapper``'s arguments (optimizer, clip_grad,
            accumulative_counts).
    """

    def __init__(self, dtype='bfloat16', device_type='cpu', **kwargs):
        check_choice('AutocastOptimWrapper', 'dtype', dtype, ('bfloat16', 'float16'))
        check_choice('AutocastOptimWrapper', 'device_type', device_type, ('cpu', 'cuda'))
        super().__init__(**kwargs)
        self.cast_dtype = getattr(torch, dtype)
        self.device_type = device_type

    @contextlib.contextmanager
    def optim_context(self, model):
        with super().optim_context(model), \
                torch.autocast(self.device_type, dtype=self.cast_dtype):
            yield

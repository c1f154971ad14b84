"""mmengine's PyTorch launcher and DDP wrapper on a machine with no accelerator.

Why: mmengine 0.10.7's ``_init_dist_pytorch`` ends, on any machine without MLU/NPU/MUSA,
in ``torch.cuda.set_device`` (which raises without CUDA), and its Runner wraps the model
in DDP with ``device_ids=[local_rank]``, which DDP refuses for a CPU module.

What: both are wrapped, not replaced, and act only in the plain CPU case. The launcher:
when no CUDA, MLU, NPU or MUSA device exists and ``init_backend='torch'``, the process
group is initialised with gloo (``nccl`` becomes gloo with a warning: it needs CUDA);
in every other case (an accelerator, deepspeed, colossalai) mmengine's own function
runs unchanged. DDP: ``device_ids``/``output_device`` are dropped only when the wrapped
module's parameters are on the CPU.

Versions: mmengine 0.10.x.
"""
import functools
import warnings

import torch
import torch.distributed as torch_dist
from mmengine import device as mm_device
from mmengine.dist import utils as dist_utils
from mmengine.model.wrappers import MMDistributedDataParallel

_ORIGINAL = {}


def has_accelerator() -> bool:
    """Whether mmengine would use a device for this process (CUDA, MLU, NPU, MUSA)."""
    return (torch.cuda.is_available() or mm_device.is_mlu_available()
            or mm_device.is_npu_available() or mm_device.is_musa_available())


def _launcher(original):
    @functools.wraps(original)
    def init_dist_pytorch(backend, init_backend='torch', **kwargs):
        if has_accelerator() or init_backend != 'torch':
            return original(backend, init_backend=init_backend, **kwargs)
        if backend == 'nccl':
            warnings.warn('no accelerator: initialising the process group with gloo '
                          'instead of nccl (which needs CUDA)')
            backend = 'gloo'
        torch_dist.init_process_group(backend=backend, **kwargs)
    return init_dist_pytorch


def _on_cpu(module) -> bool:
    param = next(iter(module.parameters()), None)
    return param is not None and param.device.type == 'cpu'


def _ddp_init(original):
    @functools.wraps(original)
    def init(self, module, *args, **kwargs):
        if _on_cpu(module):  # DDP accepts device_ids only for modules on a device
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        original(self, module, *args, **kwargs)
    return init


def apply() -> None:
    """Wrap mmengine's launcher and DDP wrapper (idempotent)."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(launcher=dist_utils._init_dist_pytorch,
                     ddp_init=MMDistributedDataParallel.__init__)
    dist_utils._init_dist_pytorch = _launcher(_ORIGINAL['launcher'])
    MMDistributedDataParallel.__init__ = _ddp_init(_ORIGINAL['ddp_init'])


def revert() -> None:
    """Restore mmengine's own launcher and DDP wrapper."""
    if not _ORIGINAL:
        return
    dist_utils._init_dist_pytorch = _ORIGINAL.pop('launcher')
    MMDistributedDataParallel.__init__ = _ORIGINAL.pop('ddp_init')

"""Narrow fixes for version quirks of the stack, applied once on ``import mmdet_bnplug``.

1. torch >= 2.6 loads checkpoints with ``weights_only=True`` by default, and mmengine 0.10.7
   calls ``torch.load`` without the argument, so its own checkpoints (message hub history
   buffers, numpy arrays in the log state) fail to load. The classes those checkpoints
   need are added to torch's safe-globals allow-list; safe loading stays on.
2. On a machine without CUDA, mmengine's PyTorch launcher calls ``torch.cuda.set_device``
   and its DDP wrapping passes ``device_ids`` for a CPU model; both raise. Without CUDA
   the launcher uses gloo (nccl needs CUDA) and DDP gets no ``device_ids``.
"""
import warnings

import numpy as np
import torch
import torch.distributed as torch_dist
from mmengine.dist import utils as dist_utils
from mmengine.logging import HistoryBuffer
from mmengine.model.wrappers import MMDistributedDataParallel


def _numpy_checkpoint_globals():
    """numpy's pickling entry points and the dtype classes of mmengine's logged values."""
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed np.core to np._core
    dtype_classes = [type(np.dtype(name)) for name in
                     ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    return [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype,
            *dtype_classes]


def allow_mmengine_checkpoints():
    """Allow-list, for ``weights_only`` loading, exactly what mmengine checkpoints hold.

    ``getattr`` is there because a pickled HistoryBuffer names its statistics methods as
    ``getattr(HistoryBuffer, 'min')``; the unpickler still refuses to *call* anything that
    is not allow-listed, so it fetches attributes but cannot run them.
    """
    torch.serialization.add_safe_globals(
        [HistoryBuffer, getattr, *_numpy_checkpoint_globals()])


def _init_dist_pytorch_without_cuda(backend, init_backend='torch', **kwargs):
    """mmengine's PyTorch-launcher initialisation, for machines without CUDA: gloo."""
    if backend == 'nccl':
        warnings.warn('CUDA is not available: using the gloo backend instead of nccl')
        backend = 'gloo'
    if init_backend != 'torch':
        raise ValueError(f'init_backend={init_backend!r} needs CUDA; without CUDA only '
                         "'torch' is supported")
    torch_dist.init_process_group(backend=backend, **kwargs)


def _patch_cpu_distributed():
    """Make mmengine's launcher and DDP wrapper work on CPU-only machines."""
    if torch.cuda.is_available():
        return
    dist_utils._init_dist_pytorch = _init_dist_pytorch_without_cuda
    ddp_init = MMDistributedDataParallel.__init__
    if getattr(ddp_init, '_bnplug_cpu_patch', False):
        return

    def init_without_device_ids(self, module, *args, **kwargs):
        # DDP accepts device_ids only for modules on an accelerator
        kwargs.pop('device_ids', None)
        kwargs.pop('output_device', None)
        ddp_init(self, module, *args, **kwargs)

    init_without_device_ids._bnplug_cpu_patch = True
    MMDistributedDataParallel.__init__ = init_without_device_ids


allow_mmengine_checkpoints()
_patch_cpu_distributed()

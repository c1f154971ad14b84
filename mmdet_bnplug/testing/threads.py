"""Torch's thread count, pinned for a block of tiny-tensor work."""
import contextlib

import torch


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Run the block with ``count`` torch threads (one avoids OpenMP stalls on tiny
    tensors on a busy machine), then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)

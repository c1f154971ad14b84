"""Is this forward a recomputation? Activation checkpointing (``torch.utils.checkpoint``,
reentrant or not; mmdet's ``with_cp=True``) re-runs forwards inside the backward pass,
where stateful layers must not advance their statistics a second time."""
import torch


def inside_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread."""
    task_id = getattr(torch._C, '_current_graph_task_id', None)
    return task_id is not None and task_id() != -1

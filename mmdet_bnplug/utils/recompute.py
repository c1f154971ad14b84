"""Is this forward a recomputation? Activation checkpointing (``torch.utils.checkpoint``,
reentrant or not; mmdet's ``with_cp=True``) re-runs forwards inside the backward pass,
where stateful layers must not advance their statistics a second time."""
import torch


def inside_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread. False while
    torch.compile traces (a compiled graph is recomputed by the compiler's own
    activation checkpointing, not by re-running this Python code)."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, '_current_graph_task_id', None)
    return task_id is not None and task_id() != -1

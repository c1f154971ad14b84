"""Module-tree surgery shared by the transforms and the per-level heads."""
from torch import nn


def replace_modules(model: nn.Module, old_to_new: dict) -> nn.Module:
    """Put ``old_to_new[id(old)]`` wherever ``old`` is a child below ``model`` (a module
    registered at several places is replaced at each), in place; returns ``model``, or
    its replacement when ``model`` itself is one of the old modules."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() dedups
            if id(child) in old_to_new:
                setattr(parent, name, old_to_new[id(child)])
    return old_to_new.get(id(model), model)

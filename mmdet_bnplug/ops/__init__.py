"""Compiled kernels of the layers (built by setup.py) and the torch.library ops that use
them; importing registers the ops (namespace ``mmdet_bnplug``)."""
from . import mabn  # noqa: F401

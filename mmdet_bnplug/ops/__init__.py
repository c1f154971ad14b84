"""Compiled kernels of the layers (built by setup.py) and the torch.library ops that use
them; importing registers the ops (namespace ``mmdet_bnplug``): channel_combine (a
per-channel affine combination, norm layers' input gradient), mabn (MABN's training step)."""
from . import channel_combine, mabn  # noqa: F401

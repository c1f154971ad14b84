"""Ghost-batch normalisation and the study's small ResNet classifier."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import nn


class GhostNorm(nn.Module):
    """Runs ``norm`` separately on consecutive chunks of ``ghost_size`` samples.

    In training mode an ``(N, C, *)`` input is split along dim 0 into chunks of
    ``ghost_size`` (the last one shorter if ``N`` is not a multiple), ``norm`` is called
    once per chunk, in order, and the outputs are concatenated: batch statistics come
    from ``ghost_size`` samples (the "normalisation batch") while the SGD batch is ``N``.
    Every chunk is one call of the layer, so stateful layers advance once per chunk
    (BN's running averages; MABN's counter and ring buffers). ``ghost_size=None``, or
    eval mode, calls ``norm`` once on the whole input. The wrapped layer is the
    ``norm`` attribute (state-dict keys ``<name>.norm.*``).
    """

    def __init__(self, norm: nn.Module, ghost_size: Optional[int] = None):
        super().__init__()
        if ghost_size is not None and (isinstance(ghost_size, bool)
                                       or not isinstance(ghost_size, int) or ghost_size < 1):
            raise ValueError(f'GhostNorm: ghost_size must be None or an int >= 1, '
                             f'got {ghost_size!r}')
        self.norm = norm
        self.ghost_size = ghost_size

    def extra_repr(self) -> str:
        return f'ghost_size={self.ghost_size}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ghost_size is None or x.shape[0] <= self.ghost_size:
            return self.norm(x)
        return torch.cat([self.norm(chunk) for chunk in x.split(self.ghost_size)])


class _Block(nn.Module):
    """ResNet basic block: two 3x3 convs, projection shortcut when the shape changes."""

    def __init__(self, make_conv, make_norm, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = make_conv(in_ch, out_ch, 3, stride)
        self.norm1 = make_norm(out_ch)
        self.conv2 = make_conv(out_ch, out_ch, 3, 1)
        self.norm2 = make_norm(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(make_conv(in_ch, out_ch, 1, stride),
                                          make_norm(out_ch))

    def forward(self, x):
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class SmallResNet(nn.Module):
    """3x3 stem and one basic block per stage (stride 1, then 2), global average
    pooling, linear head ``fc``. Input ``(N, 3, S, S)``, output logits
    ``(N, num_classes)``. Norm and conv come from mmcv configs, so every layer of
    the plugin is built exactly as in a detector config; every norm is wrapped in a
    ``GhostNorm(ghost_size)``."""

    def __init__(self, widths: Sequence[int], num_classes: int, norm_cfg: dict,
                 conv_cfg: Optional[dict] = None, ghost_size: Optional[int] = None):
        super().__init__()

        def make_conv(in_ch, out_ch, kernel, stride):
            return build_conv_layer(conv_cfg, in_ch, out_ch, kernel, stride, kernel // 2,
                                    bias=False)

        def make_norm(ch):
            return GhostNorm(build_norm_layer(norm_cfg, ch)[1], ghost_size)

        self.stem = nn.Sequential(make_conv(3, widths[0], 3, 1), make_norm(widths[0]),
                                  nn.ReLU())
        blocks, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            blocks.append(_Block(make_conv, make_norm, in_ch, width, 1 if i == 0 else 2))
            in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(x.mean((2, 3)))

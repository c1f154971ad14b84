"""ConvWC: convolution with weight centralisation, the conv that MABN expects."""
import torch
from mmengine.registry import MODELS
from torch import nn


@MODELS.register_module()
class ConvWC(nn.Conv2d):
    """``nn.Conv2d`` that convolves with its kernel centred per output channel.

    ``W'[o] = W[o] - mean(W[o])`` (mean over input channels and taps); gradients
    flow through the centring. MABN normalises without subtracting a mean, so the
    centring takes that role (Yan et al., ICLR 2020). Same arguments as
    ``nn.Conv2d``; registered in mmengine's root MODELS for ``conv_cfg``.
    A BN checkpoint's kernels load unchanged, but the centring changes the outputs:
    ``mmdet_bnplug.transforms.mabn_from_bn`` measures by how much.
    """

    @property
    def centred_weight(self) -> torch.Tensor:
        """The kernel actually applied, ``(out, in / groups, kh, kw)``."""
        return self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.centred_weight, self.bias)

"""Load a BN checkpoint into a ConvWC + MABN model and measure how far outputs move.

The norms map eval-exactly (``MABN`` does it on load: ``running_var := var + mean^2``,
the mean absorbed into weight and bias). The convolutions do not: ConvWC centres each
kernel, which changes its output by ``mean(W[o])`` times the local sum of the input.
This module measures that change, per layer and overall, against the BN model the
checkpoint describes, on a sample input; ``tools/mabn_from_bn.py`` is its command line.
"""
import copy

import torch
from torch import nn

from ..layers.conv_wc import ConvWC
from ..layers.mabn import MABN
from ..utils.outputs import relative_change


def bn_equivalent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` computing what the BN checkpoint computed: every ConvWC an
    ``nn.Conv2d`` with the same (uncentred) kernel, every MABN the ``nn.BatchNorm2d``
    with the same eval map. In eval mode."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ConvWC):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, child.dilation, child.groups,
                                 child.bias is not None, child.padding_mode)
                conv.load_state_dict(child.state_dict())
                setattr(parent, name, conv.to(child.weight).eval())
            elif isinstance(child, MABN):
                bn = nn.BatchNorm2d(child.num_features, child.eps, affine=child.affine)
                bn.load_state_dict(child.batchnorm_state())
                setattr(parent, name, bn.to(child.running_var).eval())
    ref.eval()  # (some mmdet modules' train() does not return self)
    return ref


@torch.no_grad()
def output_change(model: nn.Module, inputs: torch.Tensor, forward=None) -> dict:
    """Relative output change ``||y - y_bn|| / ||y_bn||`` of ``model`` (eval mode) against
    ``bn_equivalent(model)`` on ``inputs``.

    Returns ``{'conv': {name: change}, 'norm': {name: change}, 'output': change}``:
    ``conv`` is each ConvWC alone (centred vs. uncentred kernel on the BN model's input
    to that layer), ``norm`` the drift accumulated up to each MABN's output, ``output``
    the whole forward. ``forward(model, inputs)`` defaults to ``model.extract_feat``
    when the model has it (detectors), else ``model(inputs)``.
    """
    if forward is None:
        def forward(m, x):
            return m.extract_feat(x) if hasattr(m, 'extract_feat') else m(x)

    ref = bn_equivalent(model)
    was_training = model.training
    model.eval()
    names = {n for n, m in model.named_modules() if isinstance(m, (ConvWC, MABN))}
    captured = {'ours': {}, 'ref': {}, 'conv_in': {}}

    def hook(store, name):
        def record(module, args, out):
            captured[store][name] = out
            if store == 'ref' and isinstance(module, nn.Conv2d):
                captured['conv_in'][name] = args[0]
        return record

    handles = [m.register_forward_hook(hook('ours', n)) for n, m in model.named_modules()
               if n in names]
    handles += [m.register_forward_hook(hook('ref', n)) for n, m in ref.named_modules()
                if n in names]
    try:
        out, out_ref = forward(model, inputs), forward(ref, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    modules = dict(model.named_modules())
    conv = {}
    for name, x in captured['conv_in'].items():
        layer = modules[name]
        own = layer._conv_forward(x, layer.centred_weight, layer.bias)
        conv[name] = relative_change(own, captured['ref'][name])
    norm = {n: relative_change(captured['ours'][n], captured['ref'][n])
            for n in captured['ours'] if isinstance(modules[n], MABN)}
    return dict(conv=conv, norm=norm, output=relative_change(out, out_ref))


def format_report(change: dict) -> str:
    """``output_change``'s result as text: two sections of ``layer  change``."""
    lines = ['relative output change vs. the BN model, each ConvWC alone:']
    lines += [f'  {n:<40}{v:>10.4f}' for n, v in change['conv'].items()]
    lines.append('accumulated up to each MABN output:')
    lines += [f'  {n:<40}{v:>10.4f}' for n, v in change['norm'].items()]
    lines.append(f'whole forward: {change["output"]:.4f}')
    return '\n'.join(lines)

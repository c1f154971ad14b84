"""``fuse_norm``: fold norms into the convolution that feeds them, for inference.

A norm is folded only where the data flow ``norm(conv(x))``, with the conv's output used
by nothing else, is proven: by structure (``nn.Sequential``, mmcv ``ConvModule`` with
its norm right after its conv, mmdet's ResNet stem and blocks, each with its own
``forward``), or, for any other conv registered just before a norm, on a probe input
(``example_inputs``). Pairs that cannot be proven are left alone and reported.
"""
import copy
import logging
from contextlib import nullcontext

import torch
from mmcv.cnn import ConvModule
from mmcv.cnn.bricks.wrappers import Conv2d as MMCVConv2d
from mmcv.cnn.bricks.wrappers import Conv3d as MMCVConv3d
from mmengine.logging import print_log
from torch import nn

from ..layers.level_norm import LevelNorm, LevelRouted, at_level, current_level
from ..utils.bn_like import eval_affine, is_bn_like
from ..utils.outputs import relative_change

_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, MMCVConv2d, MMCVConv3d)


def _kernel(conv):
    """The kernel a conv applies if it is a plain convolution of it, else None."""
    if isinstance(conv, nn.modules.conv._ConvNd) and hasattr(conv, 'centred_weight'):
        kernel = conv.centred_weight  # ConvWC
        return kernel() if callable(kernel) else kernel
    return conv.weight if type(conv) in _PLAIN_CONVS else None


def _is_norm(module) -> bool:
    return is_bn_like(module) or hasattr(module, 'eval_scale_shift')


def _foldable_norm(norm, channels) -> bool:
    """A norm (or a LevelNorm of norms) with a fixed eval map over ``channels``."""
    norms = list(norm) if isinstance(norm, LevelNorm) else [norm]
    return all(_is_norm(n) and getattr(n, 'running_var', 0) is not None and
               n.num_features == channels for n in norms)


def _mmdet_resnet_flows():
    """``{class: function(module) -> [(conv name, norm name)]}`` for mmdet's ResNet parts
    whose ``forward`` applies each norm right to its conv's output (read from mmdet 3.x)."""
    try:
        from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:
        return {}
    return {
        BasicBlock: lambda m: [('conv1', m.norm1_name), ('conv2', m.norm2_name)],
        Bottleneck: lambda m: [('conv1', m.norm1_name), ('conv2', m.norm2_name),
                               ('conv3', m.norm3_name)],
        ResNet: lambda m: [] if m.deep_stem else [('conv1', m.norm1_name)],
    }


def _own_forward(module, cls) -> bool:
    return isinstance(module, cls) and type(module).forward is cls.forward


def proven_pairs(parent: nn.Module) -> list:
    """``[(conv name, norm name)]`` of ``parent``'s children whose data flow is known
    from ``parent``'s class: ``norm(conv(x))``, the conv's output used by nothing else."""
    if _own_forward(parent, nn.Sequential):
        names = [n for n, m in parent._modules.items() if m is not None]
        return list(zip(names, names[1:]))
    if _own_forward(parent, ConvModule):
        order = list(parent.order)
        if parent.with_norm and order.index('norm') == order.index('conv') + 1:
            return [('conv', parent.norm_name)]
        return []
    for cls, pairs in _mmdet_resnet_flows().items():
        if _own_forward(parent, cls):
            return pairs(parent)
    return []


def _candidates(model):
    """``{(parent name, conv name, norm name): proven}`` for every foldable conv-norm pair:
    proven pairs, and each foldable norm registered right after a foldable conv."""
    found = {}
    for parent_name, parent in model.named_modules():
        children = {n: m for n, m in parent._modules.items() if m is not None}
        names = list(children)
        pairs = [(p, True) for p in proven_pairs(parent)]
        pairs += [(p, False) for p in zip(names, names[1:])]
        for (conv_name, norm_name), proven in pairs:
            conv, norm = children.get(conv_name), children.get(norm_name)
            kernel = None if conv is None else _kernel(conv)
            if norm is None or kernel is None or not _foldable_norm(norm, kernel.shape[0]):
                continue
            key = (parent_name, conv_name, norm_name)
            found[key] = found.get(key, False) or proven
    return found


def _folded_conv(conv, kernel, scale, shift):
    """A plain ``nn.ConvNd`` computing ``scale * conv(x) + shift`` (per output channel)."""
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[kernel.dim() - 3]
    fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, True, conv.padding_mode,
                device=kernel.device, dtype=kernel.dtype)
    scale, shift = scale.double(), shift.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    with torch.no_grad():
        fused.weight.copy_(kernel.double() * scale.view(-1, *[1] * (kernel.dim() - 1)))
        fused.bias.copy_(bias)
    return fused.train(conv.training)


def _folded(conv, norm):
    """The fused conv of ``norm(conv(x))``; for a LevelNorm, one fused conv per level
    (a LevelRouted: exact per level, the shared conv's kernel folded with each level's
    norm)."""
    with torch.no_grad():
        kernel = _kernel(conv)
        if isinstance(norm, LevelNorm):
            return LevelRouted([_folded_conv(conv, kernel, *eval_affine(n)) for n in norm])
        return _folded_conv(conv, kernel, *eval_affine(norm))


def _fold(model, pairs):
    """Replace each (parent, conv, norm) of ``pairs`` by (fused conv, Identity), in place."""
    for parent_name, conv_name, norm_name in pairs:
        parent = model.get_submodule(parent_name)
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        setattr(parent, conv_name, _folded(conv, norm))
        setattr(parent, norm_name, nn.Identity())


def _in_eval(model, run):
    """``run()`` with every module in eval mode, each module's flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return run()
    finally:
        for module, flag in flags:
            module.training = flag


def _verified_on_probe(model, pairs, probe, atol):
    """The pairs of ``pairs`` that the probe shows to be ``norm(conv(x))`` with nothing
    else reading the conv's output: locally (the norm's input is the conv's output
    tensor and the folded conv reproduces the norm's output) and for the whole model
    (folding them leaves the output unchanged)."""
    calls = {}

    def recorder(key, role):
        def hook(module, args, out):
            # (input object, input copy, output object, output copy): copies, because
            # later in-place ops (ReLU(inplace=True), +=) change the tensors themselves
            x = args[0] if args else None
            copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in (x, out)]
            calls.setdefault((key, role), []).append(
                (x, copies[0], out, copies[1], current_level()))
        return hook

    handles = []
    for key in pairs:
        parent = model.get_submodule(key[0])
        handles.append(getattr(parent, key[1]).register_forward_hook(recorder(key, 'conv')))
        handles.append(getattr(parent, key[2]).register_forward_hook(recorder(key, 'norm')))
    try:
        reference = _in_eval(model, lambda: probe(model))
    finally:
        for handle in handles:
            handle.remove()

    def locally_exact(key):
        conv_calls, norm_calls = calls.get((key, 'conv'), []), calls.get((key, 'norm'), [])
        if not conv_calls or len(conv_calls) != len(norm_calls):
            return False
        parent = model.get_submodule(key[0])
        conv, norm = getattr(parent, key[1]), getattr(parent, key[2])
        fused = _folded(conv, norm).eval()

        def fused_output(x, level):
            with torch.no_grad(), at_level(level) if level is not None else nullcontext():
                return fused(x)
        return all(norm_in is conv_out and
                   relative_change(fused_output(conv_in, level), norm_out) <= atol
                   for (_, conv_in, conv_out, _, level), (norm_in, _, _, norm_out, _)
                   in zip(conv_calls, norm_calls))

    def whole_model_exact(keys):
        folded = copy.deepcopy(model)
        _fold(folded, keys)
        return relative_change(_in_eval(folded, lambda: probe(folded)), reference) <= atol

    local = [key for key in pairs if locally_exact(key)]
    if not local or whole_model_exact(local):
        return local
    kept = [key for key in local if whole_model_exact([key])]
    return kept if whole_model_exact(kept) else []


# norms whose eval output depends on the sample itself: no fixed map to fold
_RUNTIME_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def fuse_norm(model: nn.Module, example_inputs=None, forward=None,
              atol: float = 1e-5) -> nn.Module:
    """Fold every foldable norm into the conv that feeds it, in place; for inference.

    Foldable norms have a fixed per-channel eval map (BN family, EvalBN, SyncBN,
    PortableSyncBN, mmdet FrozenBN, MABN and any layer with ``eval_scale_shift``); the
    conv must be a plain ``nn.Conv1d/2d/3d`` (mmcv's wrappers included) or expose
    ``centred_weight`` (ConvWC). It becomes a plain ``nn.ConvNd`` with bias and the
    norm an ``nn.Identity``; the result computes the eval-mode output.

    Args:
        model: the model.
        example_inputs: a probe input (a tensor, or a tuple of ``forward``'s arguments).
            Without it only pairs proven by structure are folded (``nn.Sequential``,
            mmcv ``ConvModule``, mmdet's ResNet stem and blocks); with it, a conv
            registered just before a norm is folded too when the probe shows that the
            norm reads exactly the conv's output, and the whole folded model is checked
            against the original (relative change <= ``atol``). Pairs that fail are left
            alone.
        forward: ``forward(model, *example_inputs)``; default ``model(*example_inputs)``.
        atol: largest accepted relative change of an output on the probe.

    Norms left unfused are logged, with the reason (:func:`fuse_norm_report`).
    """
    unfused = fuse_norm_report(model, example_inputs, forward, atol)
    if unfused:
        by_reason = {}
        for name, reason in unfused.items():
            by_reason.setdefault(reason, []).append(name or '<root>')
        print_log('fuse_norm: norm layers not fused: ' + '; '.join(
            f'{len(names)} ({reason}): {", ".join(names)}'
            for reason, names in by_reason.items()), logger='current', level=logging.WARNING)
    return model


def fuse_norm_report(model: nn.Module, example_inputs=None, forward=None,
                     atol: float = 1e-5) -> dict:
    """:func:`fuse_norm` without the log: folds in place and returns ``{module name: why
    it is left}`` for every norm layer left unfused (BN-like layers and layers that
    normalise with per-sample statistics: GroupNorm, LayerNorm, InstanceNorm), in
    ``named_modules()`` order."""
    candidates = _candidates(model)
    proven = [key for key, is_proven in candidates.items() if is_proven]
    unproven = [key for key, is_proven in candidates.items() if not is_proven]
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs, )
        run = forward or (lambda m, *a: m(*a))
        verified = _verified_on_probe(model, proven + unproven, lambda m: run(m, *args),
                                      atol)
        refused = [key for key in proven + unproven if key not in verified]
        to_fold, reason = verified, 'the probe input shows another data flow'
    else:
        to_fold, refused = proven, unproven
        reason = ('registered after a conv, but the data flow is unproven; pass '
                  'example_inputs to verify it on a probe input')
    _fold(model, to_fold)
    refused = {'.'.join(filter(None, (p, n))): reason for p, _, n in refused}
    fed = {'.'.join(filter(None, (p, n))) for p, _, n in candidates}
    unfused = {}
    for name, module in model.named_modules():
        level_of = name.rpartition('.')[0]  # a LevelNorm's level: the LevelNorm's reason
        if name in refused or level_of in refused:
            unfused[name] = refused.get(name, refused.get(level_of))
        elif _is_norm(module) and name not in fed and level_of not in fed:
            unfused[name] = 'no plain conv registered just before it'
        elif isinstance(module, _RUNTIME_NORMS):
            unfused[name] = (f'{type(module).__name__} normalises with per-sample '
                             'statistics at run time: not foldable')
    return unfused

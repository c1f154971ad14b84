"""Diagnostic MABN for the detection small-batch study (not part of the package).

``MABNDiag`` is the spec's MABN (``docs/mabn_spec.md``) written as plain tensor
ops, with switches to turn each of its parts off, so that the study can measure which
part destabilises training at 2 images per batch:

- ``fwd_sma``: forward statistic from the ring buffer (else this batch's E[x^2]);
- ``bwd_sma``: backward statistic mean(g z) from the ring buffer (else this batch's);
- ``renorm``:  the renorm factor r (else r = 1 throughout).

With all three on it is the package's ``MABN`` (same phases, same state). It also
records, per training step, how stale the moving averages are:
``stale_fwd = mean_c |s2 - x2| / x2`` (SMA against this batch's second moment) and
``stale_bwd = mean_c |mgz - gz| / mean_c |gz|`` (SMA against this batch's backward
statistic); ``StalenessHook`` averages them over the model's ``MABNDiag`` layers and
logs them as ``train/stale_fwd`` and ``train/stale_bwd`` in mmengine's scalars.

Load it with ``custom_imports=dict(imports=['benchmarks.det_study.diag_layers'])`` and
the worktree on ``PYTHONPATH`` (the study script does both).
"""
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, MODELS

from mmdet_bnplug.layers.mabn import MABN


class _DiagFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = (1, c) + (1, ) * (x.dim() - 2)
        x2 = (x * x).mean(dims)
        layer.num_batches_tracked += 1
        t = int(layer.num_batches_tracked)
        slot = t % layer.buffer_size
        layer.buffer_x2[slot] = x2
        use_batch = t <= layer.buffer_size or t < layer.warmup_iters
        if use_batch or not layer.fwd_sma:
            s2 = x2
        else:
            s2 = layer.buffer_x2.mean(0)
        if not use_batch and layer.fwd_sma:
            layer.last_stale_fwd = float(((s2 - x2).abs() / x2.clamp_min(1e-12)).mean())
        std = (s2 + layer.eps).sqrt()
        if layer.renorm and t > max(layer.renorm_iters, layer.warmup_iters):
            r = (std / (layer.running_var + layer.eps).sqrt()).clamp(
                1 / layer.r_max, layer.r_max)
        else:
            r = torch.ones_like(std)
        layer.last_r_dev = float((r - 1).abs().mean())
        layer.running_var.lerp_(s2.detach(), layer.momentum)
        z = x / std.view(shape)
        w = weight.view(shape) if weight is not None else 1.0
        y = w * (r.view(shape) * z)
        if bias is not None:
            y = y + bias.view(shape)
        ctx.save_for_backward(z, weight, r, std)
        ctx.layer, ctx.slot, ctx.use_batch, ctx.dims, ctx.shape = (layer, slot, use_batch,
                                                                    dims, shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        z, weight, r, std = ctx.saved_tensors
        layer, dims, shape = ctx.layer, ctx.dims, ctx.shape
        w = weight.view(shape) if weight is not None else 1.0
        g = dy * w * r.view(shape)
        gz = (g * z).mean(dims)
        layer.buffer_gz[ctx.slot] = gz
        if ctx.use_batch or not layer.bwd_sma:
            mgz = gz
        else:
            mgz = layer.buffer_gz.mean(0)
            layer.last_stale_bwd = float((mgz - gz).abs().mean() /
                                         gz.abs().mean().clamp_min(1e-30))
        dx = (g - z * mgz.view(shape)) / std.view(shape)
        dw = (dy * r.view(shape) * z).sum(dims) if weight is not None else None
        db = dy.sum(dims) if weight is not None else None
        return dx, dw, db, None


@MODELS.register_module()
class MABNDiag(MABN):
    """MABN with switchable parts (``fwd_sma``, ``bwd_sma``, ``renorm``); see module."""

    def __init__(self, num_features, fwd_sma=True, bwd_sma=True, renorm=True, **kwargs):
        super().__init__(num_features, **kwargs)
        self.fwd_sma, self.bwd_sma, self.renorm = bool(fwd_sma), bool(bwd_sma), bool(renorm)
        self.last_stale_fwd = self.last_stale_bwd = self.last_r_dev = None

    def extra_repr(self):
        return (super().extra_repr() + f', fwd_sma={self.fwd_sma}, bwd_sma={self.bwd_sma}, '
                f'renorm={self.renorm}')

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training or x.numel() == 0:
            return torch.batch_norm(x, self.weight, self.bias, self.running_mean,
                                    self.running_var, False, 0.0, self.eps, False)
        return _DiagFunction.apply(x, self.weight, self.bias, self)


@HOOKS.register_module()
class StalenessHook(Hook):
    """Logs the mean over ``MABNDiag`` layers of their last step's staleness measures
    (``train/stale_fwd``, ``train/stale_bwd``) and of |r - 1| (``train/r_dev``)."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        layers = [m for m in model.modules() if isinstance(m, MABNDiag)]
        for key, attr in (('stale_fwd', 'last_stale_fwd'), ('stale_bwd', 'last_stale_bwd'),
                          ('r_dev', 'last_r_dev')):
            values = [getattr(m, attr) for m in layers if getattr(m, attr) is not None]
            if values:
                runner.message_hub.update_scalar(f'train/{key}', sum(values) / len(values))
            for m in layers:
                setattr(m, attr, None)

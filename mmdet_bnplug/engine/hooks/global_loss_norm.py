"""GlobalLossNormHook: the loss normalisers that a detection head computes per rank become
the mean over all ranks, so that N ranks x b images train like 1 process x N*b images.

Why: DDP averages the ranks' gradients. A loss ``sum_i l_i / n_r`` normalised by the
rank's own count ``n_r`` (positive anchors, sampled RoIs, masks) then averages to
``1/N sum_r (sum_{i in r} l_i / n_r)``, not the big batch's ``sum_i l_i / sum_r n_r``;
dividing each rank's sum by the group mean ``sum_r n_r / N`` instead gives exactly the
big batch's gradient. mmdet's FCOS, ATSS, GFL, TOOD, VFNet, RTMDet (and other) heads
already do this with ``reduce_mean``; the AnchorHead family and the RoI bbox and mask
heads do not. With one process, nothing changes.

What, per head instance (the class is untouched; one all_reduce of float64 counts over
the world group, the group DDP averages over, per loss call):

- AnchorHead family with AnchorHead's ``get_targets`` and a ``loss_by_feat`` that divides
  by its ``avg_factor`` (RetinaHead, RPNHead, SSDHead, RetinaSepBNHead): that
  ``avg_factor`` becomes the group mean.
- RoI bbox heads with ``BBoxHead.loss`` (Shared2FC, Shared4Conv1FC, ConvFC, DoubleConvFC):
  ``loss_cls`` and ``loss_bbox`` are rescaled from the rank's normaliser
  (``sum(label_weights > 0)``, the number of sampled RoIs) to the group mean.

mmdet's losses divide by ``avg_factor + eps`` (``weight_reduce_loss``, eps = float32's);
the group "mean" keeps that eps so that the ranks' average is the big batch's exactly.
- FCN mask heads (``FCNMaskHead.loss_and_target``): ``loss_mask``, a mean over the rank's
  positive RoIs' mask pixels, is rescaled to the group mean of positive RoIs.
"""
import torch
import torch.distributed as dist
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ...utils.checks import check_bool

_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss: sum / (avg_factor + eps)
_MARK = '_bnplug_global_loss_norm'


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_mean(values, device, eps=0.0) -> list:
    """Per float of ``values``, the ``m`` with ``N * (m + eps) = sum over the N ranks
    + eps``: the group mean (``eps=0``), or the normaliser that makes mmdet's
    ``sum / (avg_factor + eps)`` average over the ranks to the big batch's exactly. One
    all_reduce of a float64 tensor on ``device``."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return ((total + eps) / dist.get_world_size() - eps).tolist()


def _anchor_head_targets(get_targets):
    """``get_targets`` whose ``avg_factor`` (item 4 of AnchorHead's result) is the group
    mean."""
    def get_targets_with_group_mean(anchor_list, *args, **kwargs):
        targets = get_targets(anchor_list, *args, **kwargs)
        if not _distributed():
            return targets
        mean, = group_mean([targets[4]], anchor_list[0][0].device, _EPS)
        return (*targets[:4], mean, *targets[5:])
    return get_targets_with_group_mean


def _bbox_head_loss(loss):
    """``BBoxHead.loss`` with ``loss_cls`` and ``loss_bbox`` normalised by the group
    means of the rank's normalisers (no collective for a ``reduction_override`` call,
    which OHEM makes per image)."""
    def loss_with_group_mean(cls_score, bbox_pred, rois, labels, label_weights,
                             bbox_targets, bbox_weights, reduction_override=None):
        losses = loss(cls_score, bbox_pred, rois, labels, label_weights, bbox_targets,
                      bbox_weights, reduction_override=reduction_override)
        if not _distributed() or reduction_override is not None:
            return losses
        local = [max(float((label_weights > 0).sum()), 1.0), float(bbox_targets.size(0))]
        means = group_mean(local, labels.device, _EPS)
        for key, n, mean in zip(('loss_cls', 'loss_bbox'), local, means):
            if torch.is_tensor(losses.get(key)):
                losses[key] = losses[key] * ((n + _EPS) / (mean + _EPS))
        return losses
    return loss_with_group_mean


def _mask_head_loss(loss_and_target):
    """``FCNMaskHead.loss_and_target`` with ``loss_mask`` a mean over the group mean of
    positive RoIs rather than this rank's count."""
    def loss_and_target_with_group_mean(mask_preds, sampling_results, *args, **kwargs):
        result = loss_and_target(mask_preds, sampling_results, *args, **kwargs)
        if not _distributed():
            return result
        local = float(sum(len(r.pos_priors) for r in sampling_results))
        mean, = group_mean([local], mask_preds.device)
        if mean > 0:
            losses = result['loss_mask']
            losses['loss_mask'] = losses['loss_mask'] * (local / mean)
        return result
    return loss_and_target_with_group_mean


def _mmdet_heads():
    """``(covered, already_global)``: ``covered`` lists ``(base class, method name,
    accepted implementations, wrapper)``; ``already_global`` the loss implementations of
    mmdet that reduce their normalisers across ranks themselves."""
    from mmdet.models import dense_heads as dh
    from mmdet.models.roi_heads.bbox_heads import BBoxHead, DIIHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    anchor_losses = (dh.AnchorHead.loss_by_feat, dh.RPNHead.loss_by_feat,
                     dh.SSDHead.loss_by_feat)
    covered = [
        (dh.AnchorHead, 'get_targets', (dh.AnchorHead.get_targets, ), _anchor_head_targets,
         lambda head: type(head).loss_by_feat in anchor_losses),
        (BBoxHead, 'loss', (BBoxHead.loss, ), _bbox_head_loss, lambda head: True),
        (FCNMaskHead, 'loss_and_target', (FCNMaskHead.loss_and_target, ), _mask_head_loss,
         lambda head: True),
    ]
    already_global = (dh.FCOSHead, dh.ATSSHead, dh.GFLHead, dh.TOODHead, dh.VFNetHead,
                      dh.RTMDetHead, dh.DDODHead, dh.AutoAssignHead, dh.CenterNetUpdateHead,
                      dh.YOLOXHead, dh.YOLOFHead, dh.DETRHead, dh.MaskFormerHead, DIIHead)
    return covered, already_global


def _loss_heads(model):
    """``(name, module)`` of every mmdet module of ``model`` that computes a loss: dense
    heads, RoI bbox heads and mask heads."""
    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
    from mmdet.models.roi_heads.bbox_heads import BBoxHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    kinds = (BaseDenseHead, BBoxHead, FCNMaskHead)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def _rules(model) -> list:
    """``[(name, head, what, (method name, wrapper) or None)]`` for every loss head of
    ``model``, what in {'made global', 'already global', 'not covered'}."""
    covered, already_global = _mmdet_heads()
    return [(name, head, *_rule(head, covered, already_global))
            for name, head in _loss_heads(model)]


def _rule(head, covered, already_global):
    """``(what, (method name, wrapper) or None)`` for one loss head (see :func:`_rules`)."""
    for base, method, accepted, wrapper, loss_ok in covered:
        if isinstance(head, base) and getattr(type(head), method) in accepted \
                and loss_ok(head):
            return 'made global', (method, wrapper)
    return ('already global' if isinstance(head, already_global) else 'not covered'), None


def loss_norm_report(model) -> list:
    """``[(head name, class name, what)]`` for every loss head of ``model``: what
    :func:`global_loss_norm` does to it ('made global'), or 'already global' (it reduces
    across ranks itself), or 'not covered'. Changes nothing."""
    return [(name, type(head).__name__, what) for name, head, what, _ in _rules(model)]


def global_loss_norm(model, strict=True) -> list:
    """Make every per-rank loss normaliser of ``model``'s heads the group mean (see the
    module docstring); idempotent. Returns :func:`loss_norm_report`'s list; ``strict``: a
    head with a loss that is not covered raises ValueError (naming it and what is
    covered)."""
    rules = _rules(model)
    report = [(name, type(head).__name__, what) for name, head, what, _ in rules]
    missing = [(n, c) for n, c, what in report if what == 'not covered']
    if strict and missing:
        raise ValueError(
            f'GlobalLossNormHook: no rule for the loss normalisers of {missing}; covered: '
            'the AnchorHead family (AnchorHead.get_targets with the loss_by_feat of '
            'AnchorHead, RPNHead or SSDHead), RoI heads with BBoxHead.loss, FCNMaskHead; '
            "already global: mmdet's heads that reduce_mean (FCOS, ATSS, GFL, TOOD, "
            'VFNet, RTMDet, ...). Set strict=False to train with the others as they are')
    for _, head, _, rule in rules:
        if rule is not None and not getattr(head, _MARK, False):
            method, wrapper = rule
            setattr(head, method, wrapper(getattr(head, method)))
            setattr(head, _MARK, True)
    return report


@HOOKS.register_module()
class GlobalLossNormHook(Hook):
    """Before training, makes the heads' per-rank loss normalisers the group mean
    (:func:`global_loss_norm`), so that synchronised training over N ranks equals one
    process on the concatenated batch; logs what it did per head.

    Args:
        strict (bool): a head whose loss normalisers have no rule raises (default True);
            False logs it and trains it as it is.
    """

    priority = 'VERY_HIGH'

    def __init__(self, strict=True):
        check_bool('GlobalLossNormHook', 'strict', strict)
        self.strict = strict

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        report = global_loss_norm(model, self.strict)
        lines = [f'  {name or "(model)"} ({cls}): {what}' for name, cls, what in report]
        print_log('GlobalLossNormHook: loss normalisers per head\n' + '\n'.join(lines),
                  logger='current')

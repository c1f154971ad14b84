"""A detector's tensor part as one module: an image batch in, the backbone, neck and head
tensors out, before any post-processing (box decoding, NMS). This is the part that
exports to ONNX; mmdet's heads turn its outputs into boxes."""
import inspect

from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
from torch import nn


class DetectorTensors(nn.Module):
    """``forward(inputs)``: a flat tuple of tensors from ``inputs`` (N, 3, H, W) float32,
    the batch the detector's data_preprocessor makes (normalised, padded).

    Single-stage detectors (RetinaNet, FCOS, ...): what ``detector._forward(inputs)``
    returns, flattened. The groups are named after the head's ``predict_by_feat``
    parameters, one tensor per FPN level ``l``: for RetinaNet ``cls_score_l``
    (N, A*K, H_l, W_l) class logits, then ``bbox_pred_l`` (N, A*4, H_l, W_l) box deltas
    (A anchors per position, K classes). Boxes:
    ``detector.bbox_head.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=metas,
    rescale=True)``.

    Two-stage detectors (Faster/Mask R-CNN): ``feat_l`` (the neck's outputs), then
    ``rpn_cls_score_l`` and ``rpn_bbox_pred_l``. Proposals:
    ``detector.rpn_head.predict_by_feat(rpn_cls_scores, rpn_bbox_preds,
    batch_img_metas=metas, rescale=False)``; then
    ``detector.roi_head.predict(feats, proposals, data_samples, rescale=True)`` in PyTorch
    (RoI pooling of a data-dependent number of proposals stays outside the graph).
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        if isinstance(detector, TwoStageDetector) and detector.with_rpn:
            head, prefix = detector.rpn_head, 'rpn_'
        elif isinstance(detector, SingleStageDetector):
            head, prefix = detector.bbox_head, ''
        else:
            raise TypeError(f'{type(detector).__name__}: only single-stage detectors and '
                            'two-stage detectors with an RPN are supported')
        self.detector = detector
        self.two_stage = prefix == 'rpn_'
        # e.g. ['cls_scores', 'bbox_preds', 'score_factors', 'batch_img_metas', ...]
        self._head_groups = [prefix + name for name in
                             inspect.signature(head.predict_by_feat).parameters]

    def groups(self, inputs) -> dict:
        """``{group name: [tensor per level]}``, e.g. ``{'cls_scores': [...],
        'bbox_preds': [...]}``, or ``{'feats', 'rpn_cls_scores', 'rpn_bbox_preds'}``."""
        if self.two_stage:
            feats = self.detector.extract_feat(inputs)
            outs = self.detector.rpn_head(feats)
            return {'feats': list(feats), **dict(zip(self._head_groups, outs))}
        return dict(zip(self._head_groups, self.detector._forward(inputs)))

    def forward(self, inputs):
        return tuple(t for group in self.groups(inputs).values() for t in group)

    def output_names(self, inputs) -> list:
        """Names of ``forward``'s outputs: ``{group name without its plural s}_{level}``
        (``cls_score_0``, ...)."""
        return [f'{name[:-1]}_{level}' for name, group in self.groups(inputs).items()
                for level in range(len(group))]

    @staticmethod
    def regroup(outputs, names) -> dict:
        """The inverse of flattening: ``{group name: [outputs in level order]}`` from the
        outputs and their names (e.g. an onnxruntime session's, as torch tensors)."""
        grouped = {}
        for name, output in zip(names, outputs):
            grouped.setdefault(name.rsplit('_', 1)[0] + 's', []).append(output)
        return grouped

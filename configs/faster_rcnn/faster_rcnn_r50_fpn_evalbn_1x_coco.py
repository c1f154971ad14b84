# Faster R-CNN R50-FPN 1x on COCO 2017 with EvalBN in the backbone: the ImageNet BN
# statistics cannot move in any mode (norm_eval alone can be undone by later .train()
# calls or sync_bn), and NormEvalCheckHook verifies it during training.
_base_ = './faster_rcnn_r50_fpn_bn_1x_coco.py'

model = dict(
    backbone=dict(norm_cfg=dict(type='EvalBN', requires_grad=True), norm_eval=True))
custom_hooks = [dict(type='NormEvalCheckHook', interval=500, action='error')]

# RetinaNet R50-FPN 1x on COCO 2017 (data/coco/) with EvalBN in the backbone.
# mmdet's baseline freezes the ImageNet BN statistics only through ResNet's norm_eval=True,
# which later .train() calls, backbones that miss the layer type, or sync_bn can undo;
# EvalBN's statistics cannot move in any mode, and NormEvalCheckHook verifies it.
# The ImageNet weights (torchvision://resnet50) load into EvalBN unchanged.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

model = dict(
    backbone=dict(norm_cfg=dict(type='EvalBN', requires_grad=True), norm_eval=True))
custom_hooks = [dict(type='NormEvalCheckHook', interval=500, action='error')]

# Faster R-CNN R50-FPN 1x on COCO 2017 with ConvWC + MABN where the MABN paper puts them:
# the backbone, the FPN and a 4conv1fc box head, trained (norm_eval=False) at mmdet's 2
# images per GPU. buffer_size=16 (= 32 / 2 images), r_max=5 and momentum=0.02 (PyTorch's
# sense) are the paper's; warmup_iters = renorm_iters = 2000, 4x mmdet's 500-iteration
# learning-rate warm-up, is the detection recipe of docs/mabn.md (measured on the toy
# RetinaNet, not on COCO; the box head runs once per iteration, so no per-level factor).
# The ImageNet BN checkpoint loads eval-exactly into MABN, but ConvWC's centring
# moves the outputs: measure with tools/mabn_from_bn.py, or start from a ConvWC + MABN
# pretrained backbone as the paper does.
_base_ = './faster_rcnn_r50_fpn_bn_1x_coco.py'

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=2000,
                renorm_iters=2000, r_max=5.0, momentum=0.02)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                 conv_cfg=conv_cfg, norm_cfg=norm_cfg)))

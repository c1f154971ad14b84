# Faster R-CNN R50-FPN 1x on COCO 2017 (data/coco/), mmdet's own config with plain BN:
# the baseline the other norm choices in this folder are compared with.
# ImageNet-pretrained BN backbone, statistics frozen by norm_eval=True, as in mmdet.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmdet_bnplug'], allow_failed_imports=False)

model = dict(backbone=dict(norm_cfg=dict(type='BN', requires_grad=True), norm_eval=True))

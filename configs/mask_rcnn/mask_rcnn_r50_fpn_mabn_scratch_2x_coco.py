# Mask R-CNN R50-FPN on COCO 2017 as in the MABN paper's detection table: trained from
# scratch for 2x (24 epochs) at 2 images per GPU, ConvWC + MABN in the backbone, the FPN,
# a 4conv1fc box head and the mask head (paper: box AP 36.50 for MABN at 2 images per
# GPU, 32.38 for BN, 36.80 for SyncBN over 2x8). MABN on the detection recipe of
# docs/mabn.md: buffer_size=16 (= 32 / 2 images), r_max=5, momentum=0.02 (PyTorch's
# sense: the paper's 0.98 decay), and warmup_iters = renorm_iters = 2000, 4x the
# 500-iteration learning-rate warm-up below (the RoI heads run once per iteration, so no
# per-level factor). The layer's defaults would start the moving averages at iteration
# 100, the early start that spiked the gradient on the toy (study row `mabn2`; the late
# start is row `mabn2_late`). Measured on the toy RetinaNet only, not on COCO.
# The only head shared across FPN levels, the RPN, has no norm (mmdet's and the paper's);
# to norm it, use LevelNormRPNHead with norm_cfg (per-level statistics: on the toy,
# MABN in a shared RetinaNet head fails, `mabn2_all_late`, and per level trains,
# `mabn2_all_lvl_late`).
_base_ = './mask_rcnn_r50_fpn_bn_1x_coco.py'

norm_cfg = dict(type='MABN', requires_grad=True, buffer_size=16, warmup_iters=2000,
                renorm_iters=2000, r_max=5.0, momentum=0.02)
conv_cfg = dict(type='ConvWC')
model = dict(
    backbone=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg, norm_eval=False, frozen_stages=-1,
                  init_cfg=None),  # from scratch
    neck=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                       conv_cfg=conv_cfg, norm_cfg=norm_cfg),
        mask_head=dict(conv_cfg=conv_cfg, norm_cfg=norm_cfg)))

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[16, 22],
         gamma=0.1)
]
# no weight decay on the norms' affine parameters, as in mmdet's from-scratch configs
optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0))
